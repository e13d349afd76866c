#!/usr/bin/python3
"""The manual pages of the installed binaries, p11kms(1), p11kmsd(8) and
p11kms-audit(8): each renders through groff and man without a warning; no word
is broken by a hyphen groff inserted, at 40, 60 and 80 columns; every long
option a binary's --help prints is in its page, and every option the page
documents is in --help (for p11kms: every group, command and command option,
command by command); every configuration key p11kmsd parses is in p11kmsd(8),
and every key the page lists is one p11kmsd parses; no example writes a file
that it, or an earlier command of its example, reads; SEE ALSO names only pages
that exist. Needs no server. TAP output."""

import os
import re
import shlex
import subprocess
import sys

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

TIMEOUT = 60
SRCDIR = h.SRCDIR
BUILDDIR = os.environ.get("P11KMS_BUILDDIR") or os.path.normpath(os.path.join(h.HERE, "..", ".."))
# binary -> its page, relative to the source tree
PAGES = {
    "p11kms": "docs/p11kms.1",
    "p11kmsd": "docs/p11kmsd.8",
    "p11kms-audit": "docs/p11kms-audit.8",
}
WIDTHS = (40, 60, 80)
HYPHENS = ("-", "\u2010")
# Pages of other projects a SEE ALSO may name; ours must exist under docs/.
STANDARD_PAGES = {
    "softhsm2-util(1)", "systemd.exec(5)", "systemd.service(5)", "logrotate(8)", "openssl(1)",
    "aws(1)", "sqlite3(1)", "pg_dump(1)",
}
# p11kmsd --check-config is required of the page whether or not this build's
# --help names it yet: the option is part of the release the pages describe.
P11KMSD_REQUIRED_OPTIONS = {"--check-config"}
# Every binary accepts --help; running it is what this test does, so a page may
# document it even where the usage text does not name itself.
ALWAYS_ACCEPTED = {"--help"}
LONG_OPTION = re.compile(r"(?<![\w-])--[a-z](?:[a-z-]*[a-z])?")


def run(argv, env=None):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                       timeout=TIMEOUT)
    return r.returncode, r.stdout.decode("utf-8"), r.stderr.decode("utf-8")


def binary(name):
    path = os.path.join(BUILDDIR, name)
    check(os.access(path, os.X_OK), "%s is not built (P11KMS_BUILDDIR=%s)" % (path, BUILDDIR))
    return path


def help_text(argv):
    rc, out, err = run(argv)
    eq((rc, err), (0, ""), " ".join(argv))
    return out


def page_path(name):
    return os.path.join(SRCDIR, PAGES[name])


def read_page(name):
    with open(page_path(name), encoding="utf-8") as f:
        return f.read()


# ---- the page's source: what it says, section by section ------------------------------

# Escapes as the text reads once formatted: font and size changes vanish, \- and
# \(hy are hyphens, \e a backslash, \~ and "\ " spaces, \% \& \: \c nothing.
NAMED = {"hy": "-", "dq": '"', "aq": "'", "lq": '"', "rq": '"', "en": "\u2013", "em": "\u2014"}
SINGLE = {"-": "-", "e": "\\", "~": " ", " ": " ", "0": " "}
ESCAPE = re.compile(r"\\(f(?:\[[^\]]*\]|\(..|.)|s[-+]?\d|\((..)|\[([^\]]*)\]|(.))")
# Macros that join their arguments without spaces, alternating fonts.
ALTERNATING = {"BR", "RB", "BI", "IB", "IR", "RI"}


def unescape(s):
    def repl(m):
        if m.group(2) or m.group(3):
            return NAMED.get(m.group(2) or m.group(3), "")
        if m.group(4) is not None:
            return SINGLE.get(m.group(4), "")
        return ""  # a font or size change
    return ESCAPE.sub(repl, s)


def macro_args(rest):
    """A macro line's arguments, as troff splits them: by spaces, "..." quoting."""
    args, i, n = [], 0, len(rest)
    while i < n:
        while i < n and rest[i] == " ":
            i += 1
        if i >= n:
            break
        arg = []
        if rest[i] == '"':
            i += 1
            while i < n:
                if rest[i] == '"' and rest[i + 1:i + 2] == '"':
                    arg.append('"')
                    i += 2
                elif rest[i] == '"':
                    i += 1
                    break
                else:
                    arg.append(rest[i])
                    i += 1
        else:
            while i < n and rest[i] != " ":
                step = 2 if rest[i] == "\\" else 1
                arg.append(rest[i:i + step])
                i += step
        args.append("".join(arg))
    return args


def strip_comment(line):
    m = re.search(r'(?<!\\)\\"', line)
    return line[:m.start()] if m else line


def parse_page(source):
    """[(kind, macro, text)] for each source line: kind "text" or "macro"; text
    as the reader sees it (a macro's arguments joined as the macro joins them)."""
    out = []
    for raw in source.splitlines():
        line = strip_comment(raw)
        if line[:1] in (".", "'"):
            parts = line[1:].strip().split(None, 1)
            if not parts:
                continue
            name = parts[0]
            args = macro_args(parts[1]) if len(parts) > 1 else []
            sep = "" if name in ALTERNATING else " "
            out.append(("macro", name, unescape(sep.join(args))))
        else:
            out.append(("text", None, unescape(line)))
    return out


def sections(source):
    """Section name -> its parsed lines (parse_page), in order."""
    result, current = {}, None
    for kind, name, text in parse_page(source):
        if kind == "macro" and name == "SH":
            current = text.strip()
            result[current] = []
        elif current is not None:
            result[current].append((kind, name, text))
    return result


def section_text(source, *names):
    secs = sections(source)
    for n in names:
        check(n in secs, "the page has no %s section (it has %s)" % (n, sorted(secs)))
    return "\n".join(text for n in names for _, _, text in secs[n])


def tags(lines):
    """The tag lines of .TP and .TQ entries: the line after each."""
    result = []
    for i, (kind, name, _) in enumerate(lines):
        if kind == "macro" and name in ("TP", "TQ") and i + 1 < len(lines):
            result.append(lines[i + 1][2].strip())
    return result


def whole_text(source):
    return "\n".join(text for _, _, text in parse_page(source))


def long_options(text):
    return set(LONG_OPTION.findall(text))


def documented_options(source, section):
    """The long options a section's .TP entries document (their tag lines)."""
    secs = sections(source)
    check(section in secs, "the page has no %s section" % section)
    return long_options("\n".join(tags(secs[section])))


# ---- rendering ----------------------------------------------------------------------


def groff_version():
    rc, out, _ = run(["groff", "--version"])
    m = re.search(r"version (\d+)\.(\d+)", out)
    check(rc == 0 and m, "groff --version: %r" % out)
    return int(m.group(1)), int(m.group(2))


def groff_check_argv():
    argv = ["groff", "-man", "-Tutf8", "-ww", "-z"]
    # CHECKSTYLE (the man macros' own style warnings) came with groff 1.23.
    if groff_version() >= (1, 23):
        argv.append("-rCHECKSTYLE=3")
    return argv


def man_env(width):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MAN", "GROFF")) and k not in ("LANG", "LANGUAGE")}
    env.update(MANWIDTH=str(width), LC_ALL="C.UTF-8")
    return env


def man_has_warnings():
    rc, out, err = run(["man", "--help"], env=man_env(80))
    return "--warnings" in out + err


def plain(text):
    """Rendered text without overstriking or SGR sequences."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return re.sub(r".\x08", "", text)


def renderings(path):
    """(how, text) of the page at each width, through groff and through man."""
    for width in WIDTHS:
        rc, out, err = run(["groff", "-man", "-Tutf8", "-P-cbou", "-rLL=%dn" % width, path])
        eq(rc, 0, "groff at %d columns (%s)" % (width, err))
        yield "groff, %d columns" % width, plain(out)
        rc, out, err = run(["man", "-l", path], env=man_env(width))
        eq(rc, 0, "man -l at %d columns (%s)" % (width, err))
        yield "man, %d columns" % width, plain(out)


def inserted_hyphens(source, rendered):
    """Lines of rendered whose last word ends in a hyphen the source does not
    have there: one groff inserted to break the word."""
    said = whole_text(source)
    bad = []
    for line in rendered.splitlines():
        line = line.rstrip()
        if not line.endswith(HYPHENS):
            continue
        word = line.split()[-1].replace("\u2010", "-")
        if not re.search(r"(?<!\w)" + re.escape(word), said):
            bad.append(line)
    return bad


# ---- examples -----------------------------------------------------------------------

INPUT_OPTIONS = {"--in", "-i", "--config", "--check-config", "--signature", "--mac", "--file",
                 "--private-key", "--to-pem"}
OUTPUT_OPTIONS = {"--out", "-o"}
SEPARATORS = {"|", "||", "&&", ";", "&"}


def example_blocks(source):
    """The EXAMPLES section's .nf/.fi and .EX/.EE blocks, each a list of shell lines."""
    blocks, current = [], None
    for kind, name, text in sections(source).get("EXAMPLES", []):
        if kind == "macro" and name in ("nf", "EX"):
            current = []
        elif kind == "macro" and name in ("fi", "EE"):
            if current is not None:
                blocks.append(current)
            current = None
        elif current is not None and kind == "text":
            current.append(text)
    lines_of = []
    for block in blocks:
        joined, pending = [], ""
        for line in block:
            if line.endswith("\\"):
                pending += line[:-1] + " "
            else:
                joined.append(pending + line)
                pending = ""
        if pending:
            joined.append(pending)
        lines_of.append(joined)
    return lines_of


def commands(line):
    """The simple commands of a shell line, each a list of words."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    result, current = [], []
    for token in lex:
        if token in SEPARATORS:
            result.append(current)
            current = []
        else:
            current.append(token)
    result.append(current)
    return [c for c in result if c]


def reads_and_writes(words):
    """The paths a command reads and writes: redirections, the options that name
    input and output files, and positional arguments (inputs, but for the file
    p11kmsd backup writes)."""
    reads, writes, positional = set(), set(), []
    i = 0
    while i < len(words):
        w = words[i]
        nxt = words[i + 1] if i + 1 < len(words) else None
        if w.isdigit() and nxt in ("<", ">", ">>"):
            i += 1  # a file descriptor number
            continue
        if w == "<":
            reads.add(nxt)
            i += 2
            continue
        if w in (">", ">>", ">|"):
            writes.add(nxt)
            i += 2
            continue
        if w.startswith("-") and w != "-":
            name, eq_sign, value = w.partition("=")
            target = reads if name in INPUT_OPTIONS else writes if name in OUTPUT_OPTIONS else None
            if target is not None:
                target.add(value if eq_sign else nxt)
                i += 1 if eq_sign else 2
            else:
                i += 1
            continue
        positional.append(w)
        i += 1
    args = positional[1:]
    if positional[:2] == ["p11kmsd", "backup"] and len(args) >= 2:
        writes.add(args[-1])
        args = args[:-1]
    reads.update(args)
    return paths(reads), paths(writes)


def paths(words):
    """The files words name, spelled alike; "-" (stdin, stdout) names none."""
    return {os.path.normpath(w) for w in words if w and w != "-"}


def overwrites(block):
    """What in an example block writes a file it reads, or one an earlier
    command of the block read before any command wrote it (the reader's own file)."""
    problems, written, originals = [], set(), set()
    for line in block:
        for words in commands(line):
            reads, writes = reads_and_writes(words)
            for path in sorted(reads & writes):
                problems.append("%r reads and writes %s" % (line, path))
            for path in sorted(writes & (originals - reads)):
                problems.append("%r overwrites %s, which an earlier command read" % (line, path))
            originals |= reads - written
            written |= writes
    return problems


# ---- the tests ----------------------------------------------------------------------


@test
def test_pages_render_without_warnings():
    check_argv = groff_check_argv()
    warnings = man_has_warnings()
    if not warnings:
        h.diag("man has no --warnings: man -l runs without it")
    for name in PAGES:
        path = page_path(name)
        rc, out, err = run(check_argv + [path])
        eq((rc, err), (0, ""), " ".join(check_argv + [PAGES[name]]))
        argv = ["man"] + (["--warnings"] if warnings else []) + ["-l", path]
        rc, out, err = run(argv, env=man_env(80))
        eq((rc, err), (0, ""), "MANWIDTH=80 %s" % " ".join(argv))
        # The header names the page as its file does, and NAME starts with it.
        stem, section = os.path.basename(path).rsplit(".", 1)
        first = out.splitlines()[0].split()
        eq((first[0], first[-1]), ("%s(%s)" % (stem.upper(), section),) * 2, PAGES[name])
        name_text = section_text(read_page(name), "NAME").strip()
        check(name_text.startswith(stem + " - "), "%s: NAME says %r" % (PAGES[name], name_text))


@test
def test_no_word_is_broken_by_an_inserted_hyphen():
    for name in PAGES:
        source = read_page(name)
        for how, text in renderings(page_path(name)):
            eq(inserted_hyphens(source, text), [], "%s through %s" % (PAGES[name], how))


@test
def test_the_hyphen_check_sees_an_inserted_hyphen():
    # The check above must be able to fail: a word broken by groff is found,
    # a break at a hyphen of the source is not.
    source = ".TH T 1\n.SH NAME\nconfiguration read-only\n"
    eq(inserted_hyphens(source, "   configu\u2010\n   ration read-\n   only\n"),
       ["   configu\u2010"])


@test
def test_p11kmsd_help_options_are_in_its_page():
    in_help = long_options(help_text([binary("p11kmsd"), "--help"]))
    check("--config" in in_help and "--dev" in in_help, "p11kmsd --help: %r" % in_help)
    in_page = documented_options(read_page("p11kmsd"), "OPTIONS")
    eq(sorted((in_help | P11KMSD_REQUIRED_OPTIONS) - in_page), [],
       "p11kmsd --help options without an entry in p11kmsd(8) OPTIONS")


@test
def test_p11kmsd_page_options_are_in_its_help():
    # Fails while this build's p11kmsd --help lacks --check-config.
    in_help = long_options(help_text([binary("p11kmsd"), "--help"]))
    documented = documented_options(read_page("p11kmsd"), "OPTIONS")
    eq(sorted(documented - in_help - ALWAYS_ACCEPTED), [],
       "options p11kmsd(8) documents that p11kmsd --help does not print")


@test
def test_p11kmsd_commands_are_in_its_page():
    usage = help_text([binary("p11kmsd"), "--help"])
    in_help = set(re.findall(r"p11kmsd ([a-z]+) --config", usage))
    eq(in_help, {"init", "migrate", "backup"}, "the commands p11kmsd --help names")
    secs = sections(read_page("p11kmsd"))
    in_page = {t.split()[0] for t in tags(secs["COMMANDS"])}
    eq(in_page, in_help, "the commands p11kmsd(8) documents")


@test
def test_p11kms_audit_options_are_in_its_page():
    usage = help_text([binary("p11kms-audit"), "--help"])
    in_help = long_options(usage)
    check("--config" in in_help, "p11kms-audit --help: %r" % in_help)
    source = read_page("p11kms-audit")
    documented = documented_options(source, "OPTIONS")
    eq(sorted(in_help - documented), [],
       "p11kms-audit --help options without an entry in p11kms-audit(8) OPTIONS")
    eq(sorted(documented - in_help - ALWAYS_ACCEPTED), [],
       "options p11kms-audit(8) documents that p11kms-audit --help does not print")
    commands_in_page = {t.split()[0] for t in tags(sections(source)["COMMANDS"])}
    eq(commands_in_page, set(re.findall(r"usage: p11kms-audit ([a-z]+)", usage)),
       "the commands p11kms-audit(8) documents")


_p11kms_help = []


def p11kms_commands():
    """p11kms --help, and {group or None: {command: its --help}} from it and
    p11kms help GROUP (asked once: some forty runs of p11kms)."""
    if not _p11kms_help:
        _p11kms_help.append(ask_p11kms_commands())
    return _p11kms_help[0]


def ask_p11kms_commands():
    cli = binary("p11kms")
    main = help_text([cli, "--help"])
    m = re.search(r"\nGroups and commands:\n(.*?)\n\nGlobal options:", main, re.S)
    check(m, "p11kms --help has no command list:\n" + main)
    groups, top = [], []
    for line in m.group(1).splitlines():
        g = re.match(r"^  ([a-z][a-z-]*): ", line)
        c = re.match(r"^  ([a-z][a-z-]*) +\S", line)
        if g:
            groups.append(g.group(1))
        elif c:
            top.append(c.group(1))
    check(groups and top, "p11kms --help: groups %r, commands %r" % (groups, top))
    result = {None: {c: help_text([cli, c, "--help"]) for c in top}}
    for g in groups:
        listed = re.findall(r"^  ([a-z][a-z-]*)  ", help_text([cli, "help", g]), re.M)
        check(listed, "p11kms help %s lists no command" % g)
        result[g] = {c: help_text([cli, g, c, "--help"]) for c in listed}
    return main, result


def option_pairs(help_out):
    """{(spelling, long)} of the options a --help lists: (--x, --x), and (-s, --x)
    for a short form."""
    pairs = set()
    for short, long in re.findall(r"^  (?:-([a-zA-Z]), )?\s*(--[a-z][a-z-]*)", help_out, re.M):
        pairs.add((long, long))
        if short:
            pairs.add(("-" + short, long))
    return pairs


def own_options(help_out):
    """A command's --help without its global options."""
    return help_out.split("Global options:")[0]


SHORT_OR_LONG = re.compile(r"(?<![\w-])(--[a-z](?:[a-z-]*[a-z])?|-[a-zA-Z])(?![\w-])")


@test
def test_p11kms_help_options_are_in_its_page():
    # Each option an entry of its own, with the short form --help gives it.
    main, groups = p11kms_commands()
    source = read_page("p11kms")
    command_pairs = set()
    for cmds in groups.values():
        for out in cmds.values():
            command_pairs |= option_pairs(own_options(out))
    for section, pairs in (("GLOBAL OPTIONS", option_pairs(main.split("Global options:")[1])),
                           ("COMMAND OPTIONS", command_pairs)):
        check(pairs, "no options found for %s" % section)
        entries = [set(SHORT_OR_LONG.findall(t)) for t in tags(sections(source)[section])]
        documented = set().union(*entries)
        eq(sorted({long for _, long in pairs} - documented), [],
           "options p11kms --help lists without an entry in p11kms(1) %s" % section)
        eq(sorted(documented - {spelling for spelling, _ in pairs}), [],
           "options p11kms(1) %s documents that no p11kms --help lists" % section)
        for spelling, long in sorted(pairs):
            check(any(spelling in e and long in e for e in entries),
                  "p11kms(1) %s: no entry gives %s with %s" % (section, spelling, long))


@test
def test_p11kms_page_documents_each_command_as_its_help_does():
    # Each COMMANDS entry: "[group] command options...", with just the options
    # that command's --help lists besides the global ones; every command has one.
    main, groups = p11kms_commands()
    seen = set()
    for tag in tags(sections(read_page("p11kms"))["COMMANDS"]):
        words = tag.split()
        group = words[0] if words[0] in groups else None
        command = words[1] if group else words[0]
        check(command in groups[group],
              "p11kms(1) documents %r, which p11kms does not have" % " ".join(words[:2]))
        names = dict(option_pairs(own_options(groups[group][command])))
        used = set()
        for opt in SHORT_OR_LONG.findall(tag):
            check(opt in names, "p11kms(1): %r takes no %s" % (tag, opt))
            used.add(names[opt])
        eq(used, set(names.values()), "p11kms(1): the options of %r" % tag)
        seen.add((group, command))
    wanted = {(g, c) for g, cmds in groups.items() for c in cmds}
    eq(sorted(wanted - seen, key=str), [], "commands p11kms has that p11kms(1) does not document")


def parsed_settings():
    """The configuration keys p11kmsd parses: kms_config_set's strcmp and tables
    in src/server/settings.c, its client_cert.<principal> prefix, and the rate
    limiter's base_keys in src/server/ratelimit.c. Returns (keys, per-principal keys)."""
    with open(os.path.join(SRCDIR, "src", "server", "settings.c"), encoding="utf-8") as f:
        settings = f.read()
    keys = set(re.findall(r'strcmp\(key, "([a-z0-9_]+)"\)', settings))
    keys |= set(re.findall(r'\{"([a-z0-9_]+)",\s*offsetof\(', settings))
    keys |= set(re.findall(r'strncmp\(key, "([a-z0-9_]+\.)", \d+\)', settings))
    with open(os.path.join(SRCDIR, "src", "server", "ratelimit.c"), encoding="utf-8") as f:
        ratelimit = f.read()
    table = re.search(r"base_keys\[\] = \{(.*?)\n\};", ratelimit, re.S)
    check(table, "src/server/ratelimit.c: no base_keys table")
    rates = set(re.findall(r'\{"([a-z_]+)", [01],', table.group(1)))
    # The global bucket is shared: it has no per-principal form.
    per_principal = {k for k in rates if not k.endswith("_global")}
    keys |= rates
    # The parser must find the keys it is meant to: a few of each kind.
    for k in ("module", "threads", "day_seconds", "usage_bound", "client_cert.", "rate_crypto"):
        check(k in keys, "the key parser misses %s: it found %s" % (k, sorted(keys)))
    return keys, per_principal


def page_settings():
    """{key: tag} of each entry of p11kmsd(8)'s CONFIGURATION; a per-principal
    form (rate_crypto.PRINCIPAL) as "rate_crypto.<principal>", client_cert.PRINCIPAL
    as "client_cert."."""
    lines = sections(read_page("p11kmsd"))["CONFIGURATION"]
    result = {}
    for tag in tags(lines):
        m = re.match(r"^([a-z][a-z0-9_]*)(\.[A-Za-z<>_-]+)? = ", tag)
        check(m, "p11kmsd(8) CONFIGURATION: %r is not a key = value entry" % tag)
        key, principal = m.group(1), m.group(2)
        if principal and key == "client_cert":
            key = "client_cert."
        elif principal:
            key += ".<principal>"
        result[key] = tag
    return result


@test
def test_every_configuration_key_is_in_p11kmsd_page():
    keys, _ = parsed_settings()
    eq(sorted(keys - set(page_settings())), [], "keys p11kmsd parses that p11kmsd(8) lacks")


@test
def test_every_key_in_p11kmsd_page_is_parsed():
    keys, per_principal = parsed_settings()
    unknown = []
    for key in page_settings():
        if key.endswith(".<principal>"):
            if key[:-len(".<principal>")] not in per_principal:
                unknown.append(key)
        elif key not in keys:
            unknown.append(key)
    eq(unknown, [], "keys p11kmsd(8) lists that src/server/settings.c does not parse")


@test
def test_no_example_writes_a_file_it_reads():
    for name in PAGES:
        blocks = example_blocks(read_page(name))
        check(blocks, "%s has no example block" % PAGES[name])
        for block in blocks:
            eq(overwrites(block), [], PAGES[name])


@test
def test_the_example_check_sees_an_overwrite():
    # The check above must be able to fail, on each kind of overwrite.
    eq(len(overwrites(["p11kms encrypt --in f --out f"])), 1)
    eq(len(overwrites(["p11kms encrypt -k alias/x < f > ./f"])), 1)
    eq(len(overwrites(["p11kms decrypt --in=f -o f"])), 1)
    eq(len(overwrites(["p11kmsd backup --config c.conf c.conf"])), 1)
    eq(len(overwrites(["p11kms encrypt -i in.pdf -o in.pdf.p11kms",
                       "p11kms decrypt -i in.pdf.p11kms -o in.pdf"])), 1)
    eq(overwrites(["p11kms sign -i doc.txt -o doc.sig",
                   "p11kms verify --signature doc.sig -i doc.txt"]), [])


@test
def test_see_also_names_pages_that_exist():
    for name in PAGES:
        text = section_text(read_page(name), "SEE ALSO")
        named = re.findall(r"([A-Za-z0-9_.+-]+)\((\d[a-z]*)\)", text)
        check(named, "%s: SEE ALSO names no page" % PAGES[name])
        for page, section in named:
            ref = "%s(%s)" % (page, section)
            ours = os.path.exists(os.path.join(SRCDIR, "docs", "%s.%s" % (page, section)))
            check(ours or ref in STANDARD_PAGES,
                  "%s: SEE ALSO names %s, neither a page of ours nor a standard one"
                  % (PAGES[name], ref))


if __name__ == "__main__":
    sys.exit(T.run())
