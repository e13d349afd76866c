"""A strict reader of the Prometheus text exposition format 0.0.4, for tests.

The values come from prometheus_client's own parser (Debian's
python3-prometheus-client), which is lax: it takes samples of families never
announced, duplicate series, unknown escapes, broken histograms. So every line
is first checked here against the format, and the parsed result must agree
with what prometheus_client reads. Refused (PromTextError, with a line number):

  - a line that is not '# HELP name text', '# TYPE name type', another
    comment, or 'name{label="value",...} value [timestamp]' with single spaces
    (stricter than the format, which allows runs of blanks and tabs: p11kmsd
    writes single spaces); text that does not end in a newline
  - invalid metric or label names, label names starting with '__', a label
    given twice, escapes other than \\\\ \\n (and \\" in label values)
  - a sample whose family was not announced by a TYPE line before it, a
    family's samples not in one group, a second HELP or TYPE for a family
  - the same series (name and labels) twice
  - counters: a name not ending in _total, a negative or NaN value
  - histograms: a sample other than _bucket (with le), _sum, _count; per
    label set, le values not strictly increasing, no final le="+Inf", bucket
    counts decreasing or not whole, +Inf bucket not equal to _count, _sum or
    _count missing

parse(text) -> {(sample name, frozenset(labels.items())): value}
families(text) -> {family name: Family(name, type, help, samples)} in order
value(parsed, name, **labels) -> one sample's value (KeyError when absent)

Run as a script on a file (or - for stdin) to check it and list its families.
"""

import collections
import math
import re
import sys

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["PromTextError", "Family", "Sample", "parse", "families", "value"]

METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
# Go's strconv.ParseFloat takes more spellings; these are the ones a
# well-behaved exporter writes.
FLOAT = r"[+-]?(?:Inf|NaN|(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"

HELP_RE = re.compile(r"# HELP (" + METRIC_NAME + r")(?: (.*))?")
TYPE_RE = re.compile(r"# TYPE (" + METRIC_NAME + r") (counter|gauge|histogram|summary|untyped)")
SAMPLE_HEAD_RE = re.compile(METRIC_NAME)
LABEL_RE = re.compile(r'(' + LABEL_NAME + r')="((?:[^"\\\n]|\\[\\"n])*)"')
VALUE_RE = re.compile(r" (" + FLOAT + r")(?: (-?[0-9]+))?")
FLOAT_RE = re.compile(FLOAT)

SUFFIXES = {
    "counter": ("",),
    "gauge": ("",),
    "untyped": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}

Family = collections.namedtuple("Family", "name type help samples")
Sample = collections.namedtuple("Sample", "name labels value")


class PromTextError(ValueError):
    def __init__(self, lineno, message):
        where = "line %d: " % lineno if lineno else ""
        super().__init__(where + message)
        self.lineno = lineno


def _unescape(s, label_value):
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        nxt = s[i + 1] if i + 1 < len(s) else ""
        if nxt == "\\":
            out.append("\\")
        elif nxt == "n":
            out.append("\n")
        elif nxt == '"' and label_value:
            out.append('"')
        else:
            raise ValueError("invalid escape \\%s" % nxt)
        i += 2
    return "".join(out)


def _float(s):
    return float(s)  # Python reads "+Inf", "-Inf", "NaN" and decimals alike


def _parse_labels(line, pos, lineno):
    """Reads {a="x",b="y"} from pos (just after '{'); returns (labels, pos after '}')."""
    labels = {}
    while True:
        if line.startswith("}", pos):
            return labels, pos + 1
        m = LABEL_RE.match(line, pos)
        if not m:
            raise PromTextError(lineno, "bad label at column %d: %r" % (pos + 1, line))
        name = m.group(1)
        if name.startswith("__"):
            raise PromTextError(lineno, "reserved label name %s" % name)
        if name in labels:
            raise PromTextError(lineno, "label %s given twice" % name)
        labels[name] = _unescape(m.group(2), True)
        pos = m.end()
        if line.startswith(",", pos):
            pos += 1
        elif not line.startswith("}", pos):
            raise PromTextError(lineno, "expected , or } at column %d: %r" % (pos + 1, line))


def _family_of(sample_name, fams, current):
    """The announced family a sample name belongs to (the open one first), or None."""
    order = ([fams[current]] if current in fams else []) + list(fams.values())
    for fam in order:
        for suffix in SUFFIXES[fam.type]:
            if sample_name == fam.name + suffix:
                return fam
    return None


def _scan(text):
    """The strict pass: families in order, samples with our own reading of them."""
    if not isinstance(text, str):
        raise TypeError("text must be str")
    if text and not text.endswith("\n"):
        raise PromTextError(0, "text does not end in a newline")
    fams = collections.OrderedDict()
    helps = {}
    series = {}
    current = None  # the family whose group is open
    closed = set()  # families whose group has ended
    for lineno, line in enumerate(text.split("\n")[:-1], 1):
        if line == "":
            continue
        if line.startswith("#"):
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                m = (HELP_RE if line.startswith("# HELP ") else TYPE_RE).fullmatch(line)
                if not m:
                    raise PromTextError(lineno, "malformed %r" % line)
                name = m.group(1)
                if name in closed or (current is not None and current != name and
                                      name in fams):
                    raise PromTextError(lineno, "%s announced again after other families" % name)
                if line.startswith("# HELP "):
                    if name in helps:
                        raise PromTextError(lineno, "second HELP for %s" % name)
                    if name in fams and fams[name].samples:
                        raise PromTextError(lineno, "HELP for %s after its samples" % name)
                    try:
                        helps[name] = _unescape(m.group(2) or "", False)
                    except ValueError as e:
                        raise PromTextError(lineno, "HELP for %s: %s" % (name, e))
                else:
                    if name in fams:
                        raise PromTextError(lineno, "second TYPE for %s" % name)
                    fams[name] = Family(name, m.group(2), None, [])
                if current is not None and current != name:
                    closed.add(current)
                current = name
            continue  # other comments are allowed and ignored
        m = SAMPLE_HEAD_RE.match(line)
        if not m:
            raise PromTextError(lineno, "not a sample: %r" % line)
        name, pos = m.group(0), m.end()
        labels = {}
        if line.startswith("{", pos):
            labels, pos = _parse_labels(line, pos + 1, lineno)
        v = VALUE_RE.fullmatch(line, pos)
        if not v:
            raise PromTextError(lineno, "bad value in %r" % line)
        fam = _family_of(name, fams, current)
        if fam is None:
            raise PromTextError(lineno, "sample %s of no family announced by TYPE" % name)
        if fam.name != current:
            raise PromTextError(lineno, "sample %s apart from the group of %s" % (name, fam.name))
        key = (name, frozenset(labels.items()))
        if key in series:
            raise PromTextError(lineno, "series %s%s given twice" % (name, labels))
        value = _float(v.group(1))
        series[key] = value
        fam.samples.append((lineno, Sample(name, labels, value)))
    for name, fam in fams.items():
        _check_family(fam)
    return collections.OrderedDict(
        (name, Family(name, fam.type, helps.get(name), [s for _, s in fam.samples]))
        for name, fam in fams.items())


def _check_family(fam):
    if fam.type == "counter":
        if not fam.name.endswith("_total"):
            raise PromTextError(0, "counter %s does not end in _total" % fam.name)
        for lineno, s in fam.samples:
            if math.isnan(s.value) or s.value < 0:
                raise PromTextError(lineno, "counter %s is %r" % (s.name, s.value))
    elif fam.type == "histogram":
        _check_histogram(fam)


def _whole(x):
    return not math.isnan(x) and not math.isinf(x) and x >= 0 and x == int(x)


def _check_histogram(fam):
    groups = collections.OrderedDict()
    for lineno, s in fam.samples:
        rest = frozenset((k, v) for k, v in s.labels.items() if k != "le")
        g = groups.setdefault(rest, {"buckets": [], "sum": None, "count": None, "line": lineno})
        suffix = s.name[len(fam.name):]
        if suffix == "_bucket":
            if "le" not in s.labels:
                raise PromTextError(lineno, "%s without le" % s.name)
            if not FLOAT_RE.fullmatch(s.labels["le"]):
                raise PromTextError(lineno, "le=%r is not a number" % s.labels["le"])
            if g["sum"] is not None or g["count"] is not None:
                raise PromTextError(lineno, "bucket after _sum or _count")
            g["buckets"].append((lineno, float(s.labels["le"]), s.value))
        else:
            if "le" in s.labels:
                raise PromTextError(lineno, "%s with le" % s.name)
            g[suffix[1:]] = (lineno, s.value)
    for rest, g in groups.items():
        what = "%s%s" % (fam.name, dict(rest))
        if not g["buckets"] or g["buckets"][-1][1] != math.inf:
            raise PromTextError(g["line"], "%s has no final le=\"+Inf\" bucket" % what)
        if g["sum"] is None or g["count"] is None:
            raise PromTextError(g["line"], "%s lacks _sum or _count" % what)
        prev_le, prev_n = -math.inf, 0
        for lineno, le, n in g["buckets"]:
            if not le > prev_le:
                raise PromTextError(lineno, "%s: le %r not above %r" % (what, le, prev_le))
            if not _whole(n) or n < prev_n:
                raise PromTextError(lineno, "%s: bucket count %r after %r" % (what, n, prev_n))
            prev_le, prev_n = le, n
        lineno, count = g["count"]
        if not _whole(count) or count != prev_n:
            raise PromTextError(lineno, "%s: _count %r but +Inf bucket %r" % (what, count, prev_n))
        lineno, total = g["sum"]
        if math.isnan(total):
            raise PromTextError(lineno, "%s: _sum is NaN" % what)


def _same(a, b):
    return a == b or (math.isnan(a) and math.isnan(b))


def _cross_check(fams, text):
    """prometheus_client must read the same families, types and samples."""
    theirs = collections.OrderedDict()
    for metric in text_string_to_metric_families(text):
        # It names a counter family without _total and a type 'untyped' 'unknown'.
        typ = "untyped" if metric.type == "unknown" else metric.type
        for s in metric.samples:
            theirs[(s.name, frozenset(s.labels.items()))] = (typ, s.value)
    ours = collections.OrderedDict()
    for fam in fams.values():
        for s in fam.samples:
            ours[(s.name, frozenset(s.labels.items()))] = (fam.type, s.value)
    if list(ours) != list(theirs) or any(
            ours[k][0] != theirs[k][0] or not _same(ours[k][1], theirs[k][1]) for k in ours):
        raise PromTextError(0, "prometheus_client reads this text differently")


def families(text):
    """Checks text strictly; returns {name: Family(name, type, help, samples)} in order.

    type is counter, gauge, histogram, summary or untyped; help is None when
    there is no HELP line; samples are Sample(name, labels dict, value).
    """
    fams = _scan(text)
    _cross_check(fams, text)
    return fams


def parse(text):
    """Checks text strictly; returns {(sample name, frozenset(labels.items())): value}.

    Histogram buckets are keyed by name_bucket with their le label as written
    ("0.005", "+Inf").
    """
    families(text)
    out = {}
    for metric in text_string_to_metric_families(text):
        for s in metric.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed, name, **labels):
    """The value of one series in parse()'s result; KeyError when absent."""
    return parsed[(name, frozenset(labels.items()))]


def main(argv):
    if len(argv) != 2:
        sys.stderr.write("usage: promtext.py FILE|-\n")
        return 2
    text = sys.stdin.read() if argv[1] == "-" else open(argv[1], encoding="utf-8").read()
    try:
        fams = families(text)
    except PromTextError as e:
        sys.stderr.write("%s: %s\n" % (argv[1], e))
        return 1
    for fam in fams.values():
        print("%-10s %-45s %d samples" % (fam.type, fam.name, len(fam.samples)))
    print("ok: %d families, %d samples" % (len(fams), sum(len(f.samples) for f in fams.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
