#!/usr/bin/python3
"""The monitoring files against promtool and a live p11kmsd: docs/p11kms-alerts.yml
(Prometheus alerting rules) passes `promtool check rules` and its cases in
tests/integration/p11kms-alerts.test.yml pass `promtool test rules`, with a firing and
a quiet case for every alert; docs/grafana-dashboard.json is a Grafana dashboard whose
every query promtool parses, with a panel for each topic it must show (the database's
and the key cache's from p11kmsd's own metrics of them). Every metric and label the
rules and the dashboard name is in the /metrics of p11kmsd on a fresh SoftHSM2 token
(audit log on, metrics_key_ids = true) after requests that make its labelled series
appear, the database's and the key cache's series among them. Without promtool its
tests are skipped. TAP output."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
import promtext  # noqa: E402
from harness import check, eq  # noqa: E402

try:
    import yaml
except ImportError:  # Debian's python3-yaml (a dependency of awscli)
    yaml = None

T = h.TapRunner()
test = T.test

RULES = os.path.join(h.SRCDIR, "docs", "p11kms-alerts.yml")
RULE_TESTS = os.path.join(h.SRCDIR, "tests", "integration", "p11kms-alerts.test.yml")
DASHBOARD = os.path.join(h.SRCDIR, "docs", "grafana-dashboard.json")

# Series Prometheus makes itself, which the rules and the dashboard may use.
PROMETHEUS_SERIES = {"up"}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
# Grafana's interval variables, replaced by a duration before promtool parses a query.
GRAFANA_INTERVALS = ("__rate_interval", "__interval", "__range")

# The panels the dashboard must have: title, and a piece of a query of that panel.
TOPICS = [
    ("Request rate by operation and outcome", "rate(p11kms_requests_total{"),
    ("Request latency p50 by operation", "histogram_quantile(0.5,"),
    ("Request latency p99 by operation", "histogram_quantile(0.99,"),
    ("Throttled requests by class", "p11kms_throttled_total{"),
    ("Token call latency p99 by function", "p11kms_token_call_seconds_bucket{"),
    ("Token errors: failed calls by return value, KeyUnavailableException answers",
     'outcome="KeyUnavailableException"'),
    ("Token errors: failed calls by return value, KeyUnavailableException answers",
     "p11kms_token_errors_total{"),
    ("Token ready and slow", "p11kms_token_slow{"),
    ("Database transaction latency p50 and p99 by kind",
     "p11kms_database_transaction_seconds_bucket{"),
    ("Database transactions by kind", "p11kms_database_transaction_seconds_count{"),
    ("Database failures by kind, and DependencyTimeoutException and KMSInternalException "
     "answers", "p11kms_database_failures_total{"),
    ("Key cache hit rate by node", "p11kms_key_cache_lookups_total{"),
    ("Key usage against the AES-GCM IV bound", "p11kms_key_version_uses_bound{"),
    ("Decryption failures", "InvalidCiphertextException|IncorrectKeyException"),
    ("Decryption breakers", "p11kms_decrypt_breakers_open{"),
    ("Audit answers waiting", "p11kms_audit_answers_waiting{"),
    ("Audit lines per flush", "p11kms_audit_flushed_lines_total{"),
    ("Audit write failures", "p11kms_audit_write_failures_total{"),
    ("Audit flushes and their latency", "p11kms_audit_flush_seconds_bucket{"),
    ("Requests in flight and connections open", "p11kms_requests_running{"),
    ("Requests in flight and connections open", "p11kms_connections_open{"),
    ("Version and restarts", "p11kms_start_time_seconds{"),
]

METRIC_RE = re.compile(r"\bp11kms_[a-zA-Z0-9_]+")
SELECTOR_RE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*,?')
VARIABLE_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")

# A key id no key has: DescribeKey of it is a key cache miss, then a hit (known not to exist).
MISSING_KEY = "00000000-0000-4000-8000-00000000a11e"


class Ctx:
    ws = None
    token = None
    alice = None
    bob = None
    server = None
    started = None  # [before p11kmsd was started, after it was ready], time.time()
    live = None  # promtext.families() of the live /metrics
    parsed = None  # promtext.parse() of the same text


C = Ctx()


def setup():
    C.ws = h.Workspace()
    C.alice = h.new_principal("alice")
    C.bob = h.new_principal("bob")
    C.token = h.make_token(C.ws.sub("token"), "p11kms-it-monitoring")
    creds = h.write_credentials(C.ws.sub("credentials"), [C.alice, C.bob])
    # The audit log is on (write_config's default); bob's crypto bucket holds one request.
    config = h.write_config(C.ws.sub("p11kmsd.conf"), C.token, creds, metrics_key_ids="true",
                            decrypt_breaker_failures="5",
                            **{"rate_crypto.bob": "1", "burst_crypto.bob": "1"})
    C.started = [time.time()]
    C.server = h.start_config_server(config, C.token, C.ws.sub("p11kmsd.log"))
    C.started.append(time.time())


def teardown():
    h.finish(T, C.ws, C.server)


# ---- helpers -------------------------------------------------------------------


def promtool():
    path = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not path:
        raise h.Skip("promtool not installed")
    return path


def run_promtool(*args):
    """promtool ARGS: (exit status, stdout, stderr), the outputs cut to their last 3000
    characters (promtool repeats a parse error once for each of its tests)."""
    r = subprocess.run([promtool()] + list(args), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    return r.returncode, r.stdout[-3000:], r.stderr[-3000:]


def load_yaml(path):
    if yaml is None:
        raise h.Skip("python3-yaml not installed")
    with open(path) as f:
        return yaml.safe_load(f)


def rules():
    """The rules of docs/p11kms-alerts.yml, in order."""
    return [r for g in load_yaml(RULES)["groups"] for r in g["rules"]]


def alerts():
    return [r for r in rules() if "alert" in r]


def dashboard():
    with open(DASHBOARD) as f:
        return json.load(f)


def panels(doc):
    """The dashboard's panels, those inside rows included, rows themselves left out."""
    out = []
    for p in doc.get("panels", []):
        if p.get("type") == "row":
            out += p.get("panels", [])
        else:
            out.append(p)
    return out


def variables(doc):
    return {v["name"]: v for v in doc.get("templating", {}).get("list", [])}


def variable_query(v):
    q = v.get("query")
    return q.get("query", "") if isinstance(q, dict) else (q or "")


def to_promql(expr):
    """A Grafana query as PromQL: interval variables become 5m, the others the regex .*"""
    def replace(m):
        name = m.group(1) or m.group(2) or m.group(3)
        return "5m" if name in GRAFANA_INTERVALS else ".*"
    return VARIABLE_RE.sub(replace, expr)


def queries():
    """(where, PromQL) of every query the rules and the dashboard make."""
    out = [("rule %s" % (r.get("alert") or r.get("record")), r["expr"]) for r in rules()]
    doc = dashboard()
    for p in panels(doc):
        for t in p.get("targets", []):
            out.append(("panel %r %s" % (p.get("title"), t.get("refId")), to_promql(t["expr"])))
    for name, v in variables(doc).items():
        if v.get("type") == "query":
            query = variable_query(v)
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", query.strip())
            check(m, "variable %s: a label_values(SELECTOR, LABEL) query: %r" % (name, query))
            out.append(("variable %s" % name, to_promql(m.group(1))))
    return out


def prose():
    """(where, text) of the rules' annotations and the dashboard's descriptions."""
    out = [("rule %s annotation %s" % (r["alert"], k), v)
           for r in alerts() for k, v in r.get("annotations", {}).items()]
    doc = dashboard()
    out.append(("dashboard description", doc.get("description", "")))
    out += [("panel %r description" % p.get("title"), p.get("description", ""))
            for p in panels(doc)]
    return out


def live_families():
    """The families of a live /metrics, after requests that make every labelled series
    appear: data keys and decryptions (the usage gauges of the key in the node's cache,
    token calls, database reads and writes), a failed decryption, a throttled request, list
    calls, a key that does not exist looked up twice (a key cache miss, then a hit)."""
    if C.live is not None:
        return C.live
    ep = C.server.endpoint
    key = h.kms_ok(ep, "CreateKey", {}, C.alice)["KeyMetadata"]["KeyId"]
    other = h.kms_ok(ep, "CreateKey", {}, C.alice)["KeyMetadata"]["KeyId"]
    blob = h.kms_ok(ep, "GenerateDataKey", {"KeyId": key, "KeySpec": "AES_256"},
                    C.alice)["CiphertextBlob"]
    h.kms_ok(ep, "Decrypt", {"CiphertextBlob": blob}, C.alice)
    h.kms_ok(ep, "ListKeys", {}, C.alice)
    h.kms_ok(ep, "ListAliases", {}, C.alice)
    for _ in range(2):
        r = h.kms_call(ep, "DescribeKey", {"KeyId": MISSING_KEY}, C.alice)
        h.check_error_response(r, "NotFoundException", 404)
    r = h.kms_call(ep, "Decrypt", {"CiphertextBlob": base64.b64encode(os.urandom(64)).decode()},
                   C.alice)
    h.check_error_response(r, "InvalidCiphertextException", 400)
    r = h.kms_call(ep, "Decrypt", {"CiphertextBlob": blob, "KeyId": other}, C.alice)
    h.check_error_response(r, "IncorrectKeyException", 400)
    statuses = [h.kms_call(ep, "GenerateDataKey", {"KeyId": key, "KeySpec": "AES_256"},
                           C.bob).status for _ in range(3)]
    check(429 in statuses, "bob (burst 1, 1 a second) is throttled: %r" % statuses)
    r = h.get_metrics(ep)
    eq(r.status, 200, "GET /metrics")
    text = r.body.decode("utf-8")
    C.live = promtext.families(text)
    C.parsed = parsed = promtext.parse(text)
    check(promtext.value(parsed, "p11kms_throttled_total", **{"class": "crypto"}) >= 1,
          "p11kms_throttled_total counts bob's refusals")
    eq(promtext.value(parsed, "p11kms_requests_total", operation="Decrypt",
                      outcome="InvalidCiphertextException"), 1.0, "the failed Decrypt")
    return C.live


def sample_names(fams):
    """{sample name: family} of the families: a histogram's samples are NAME_bucket,
    NAME_sum and NAME_count, never NAME."""
    out = {}
    for fam in fams.values():
        for suffix in promtext.SUFFIXES[fam.type]:
            out[fam.name + suffix] = fam
    return out


def label_names(fam):
    return {k for s in fam.samples for k in s.labels if k != "le"} | TARGET_LABELS


def section_names(path):
    """The headings of a Markdown file, without their #s."""
    with open(path) as f:
        return {line.lstrip("#").strip() for line in f if re.match(r"#{1,6} ", line)}


# ---- the alerting rules ----------------------------------------------------------


@test
def test_promtool_check_rules():
    status, out, err = run_promtool("check", "rules", RULES)
    eq(status, 0, "promtool check rules (stdout %r, stderr %r)" % (out, err))
    count = len(rules())
    check(count >= 10, "the rules file has %d rules" % count)
    check("SUCCESS: %d rules found" % count in out,
          "promtool found all %d rules: %r" % (count, out))


@test
def test_promtool_test_rules():
    status, out, err = run_promtool("test", "rules", RULE_TESTS)
    eq(status, 0, "promtool test rules (stdout %r, stderr %r)" % (out, err))
    check("SUCCESS" in out, "promtool says SUCCESS: %r" % out)


@test
def test_every_alert_has_a_firing_and_a_quiet_case():
    doc = load_yaml(RULE_TESTS)
    eq([os.path.normpath(os.path.join(os.path.dirname(RULE_TESTS), f))
        for f in doc["rule_files"]], [os.path.normpath(RULES)], "the rule files tested")
    firing, quiet = set(), set()
    for case in doc["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
    names = [r["alert"] for r in alerts()]
    eq(len(set(names)), len(names), "alert names are unique")
    eq(sorted(set(names) - firing), [], "alerts without a case where they fire")
    eq(sorted(set(names) - quiet), [], "alerts without a case where they do not fire")
    eq(sorted((firing | quiet) - set(names)), [], "cases of alerts not in the rules")


@test
def test_alerts_are_labelled_and_annotated():
    sections = {name: section_names(os.path.join(h.SRCDIR, "docs", name))
                for name in os.listdir(os.path.join(h.SRCDIR, "docs")) if name.endswith(".md")}
    for r in alerts():
        name = r["alert"]
        check(re.fullmatch(r"P11kms[A-Z][A-Za-z]+", name), "%s: a P11kms... name" % name)
        check("for" in r, "%s has for:" % name)
        check(r.get("labels", {}).get("severity") in ("critical", "warning"),
              "%s: severity critical or warning: %r" % (name, r.get("labels")))
        ann = r.get("annotations", {})
        eq(sorted(ann), ["description", "runbook", "summary"], "%s: annotations" % name)
        check(all(isinstance(v, str) and v.strip() for v in ann.values()),
              "%s: annotations are non-empty text" % name)
        # The runbook names sections: "docs/FILE.md, section(s) "A", "B"; docs/OTHER.md, ...".
        # Quoted text in parentheses is an error message, not a section.
        runbook = re.sub(r"\([^()]*\)", "", ann["runbook"])
        parts = re.split(r"(docs/[\w.-]+\.md)", runbook)
        check(len(parts) > 1 and parts[1] == "docs/operations.md",
              "%s: the runbook starts at docs/operations.md: %r" % (name, ann["runbook"]))
        named = 0
        for i in range(1, len(parts), 2):
            doc = os.path.basename(parts[i])
            check(doc in sections, "%s: runbook names %s, not in docs/" % (name, parts[i]))
            for section in re.findall(r'"([^"]+)"', parts[i + 1]):
                check(section in sections[doc],
                      "%s: runbook section %r is not a heading of %s" % (name, section, parts[i]))
                named += 1
        check(named > 0, "%s: the runbook names a section: %r" % (name, ann["runbook"]))


# ---- the dashboard ---------------------------------------------------------------


@test
def test_dashboard_is_valid():
    doc = dashboard()
    eq((doc.get("uid"), doc.get("title")), ("p11kms", "p11kms"), "uid and title")
    check(isinstance(doc.get("schemaVersion"), int) and doc["schemaVersion"] >= 36,
          "schemaVersion 36 or later: %r" % doc.get("schemaVersion"))
    vs = variables(doc)
    eq((vs.get("datasource") or {}).get("type"), "datasource", "a datasource variable")
    eq(vs["datasource"].get("query"), "prometheus", "the datasource variable's type")
    for name in ("job", "instance"):
        check(name in vs and vs[name].get("type") == "query" and vs[name].get("multi"),
              "a multi-value %s variable" % name)
    ds = {"type": "prometheus", "uid": "${datasource}"}
    ids = [p.get("id") for p in doc["panels"]] + [
        q.get("id") for p in doc["panels"] if p.get("type") == "row" for q in p.get("panels", [])]
    eq(len(set(ids)), len(ids), "panel ids are unique")
    all_panels = panels(doc)
    check(len(all_panels) >= len(TOPICS), "%d panels" % len(all_panels))
    for p in all_panels:
        title = p.get("title")
        check(title, "panel %s has a title" % p.get("id"))
        eq(p.get("datasource"), ds, "panel %r: data source" % title)
        targets = p.get("targets")
        check(isinstance(targets, list) and targets, "panel %r has targets" % title)
        refs = [t.get("refId") for t in targets]
        eq(len(set(refs)), len(refs), "panel %r: refIds are unique" % title)
        for t in targets:
            check(isinstance(t.get("expr"), str) and t["expr"].strip(),
                  "panel %r target %s has an expr" % (title, t.get("refId")))
            eq(t.get("datasource", ds), ds, "panel %r target %s: data source"
               % (title, t.get("refId")))
            for m in VARIABLE_RE.finditer(t["expr"]):
                name = m.group(1) or m.group(2) or m.group(3)
                check(name in vs or name in GRAFANA_INTERVALS,
                      "panel %r uses $%s, not a variable of the dashboard" % (title, name))
            # Every series of every panel is of the chosen jobs and instances.
            for sel in SELECTOR_RE.finditer(t["expr"]):
                check('job=~"$job"' in sel.group(2) and 'instance=~"$instance"' in sel.group(2),
                      "panel %r: %s{%s} filters on $job and $instance"
                      % (title, sel.group(1), sel.group(2)))
            for m in METRIC_RE.finditer(t["expr"]):
                check(t["expr"][m.end():m.end() + 1] == "{",
                      "panel %r: %s has a selector" % (title, m.group(0)))


@test
def test_dashboard_queries_parse():
    doc = dashboard()
    rules_doc = {"groups": [{"name": "dashboard", "rules": []}]}
    for p in panels(doc):
        for t in p["targets"]:
            rules_doc["groups"][0]["rules"].append(
                {"record": "panel_%s_%s" % (p["id"], t["refId"]), "expr": to_promql(t["expr"])})
    for name, v in variables(doc).items():
        if v.get("type") == "query":
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable_query(v).strip())
            check(m, "variable %s: a label_values(SELECTOR, LABEL) query" % name)
            rules_doc["groups"][0]["rules"].append(
                {"record": "variable_%s" % name, "expr": to_promql(m.group(1))})
    count = len(rules_doc["groups"][0]["rules"])
    # JSON is YAML: promtool reads the file as a rules file.
    path = h.write_private(C.ws.sub("dashboard-queries.json"), json.dumps(rules_doc, indent=1))
    status, out, err = run_promtool("check", "rules", path)
    eq(status, 0, "promtool parses every query of the dashboard (stdout %r, stderr %r)"
       % (out, err))
    check("SUCCESS: %d rules found" % count in out, "promtool read %d queries: %r" % (count, out))


@test
def test_dashboard_has_a_panel_for_each_topic():
    by_title = {}
    for p in panels(dashboard()):
        by_title.setdefault(p["title"], []).append(p)
    for title, needle in TOPICS:
        check(title in by_title, "a panel titled %r" % title)
        eq(len(by_title[title]), 1, "one panel titled %r" % title)
        exprs = [t["expr"] for t in by_title[title][0]["targets"]]
        check(any(needle in e for e in exprs), "panel %r: a query with %r in %r"
              % (title, needle, exprs))
    p = by_title["Key usage against the AES-GCM IV bound"][0]
    check(any("p11kms_key_version_uses_reserved{" in t["expr"] and "/" in t["expr"]
              for t in p["targets"]), "key usage: reserved uses over the bound")
    p = by_title["Audit lines per flush"][0]
    check(any(re.search(r"rate\(p11kms_audit_flushed_lines_total\{.*\}\[.*\]\)\) / .*"
                        r"rate\(p11kms_audit_flushes_total\{", t["expr"])
              for t in p["targets"]), "lines per flush: the rate of lines over that of flushes")
    # The database and the key cache: p11kmsd's metrics of them, no more the requests'
    # latency or outcomes, or the token's calls, standing in for them.
    database = [t for title, _ in TOPICS if title.startswith(("Database", "Key cache"))
                for t in by_title[title][0]["targets"]]
    for t in database:
        check(not re.search(r"p11kms_request_duration_seconds|p11kms_token_call_seconds",
                            t["expr"]), "database and key cache panels: %r" % t["expr"])
    exprs = [t["expr"] for t in by_title["Database transaction latency p50 and p99 by kind"][0]
             ["targets"]]
    for q in ("0.5", "0.99"):
        check(any(re.fullmatch(r"histogram_quantile\(%s, sum by \(kind, le\) \(rate\("
                               r"p11kms_database_transaction_seconds_bucket\{[^}]*\}\[.*\]\)\)\)"
                               % re.escape(q), e) for e in exprs),
              "database latency: the %s quantile of the transactions by kind: %r" % (q, exprs))
    exprs = [t["expr"] for t in by_title["Database transactions by kind"][0]["targets"]]
    check(any(re.search(r"sum by \(kind\) \(rate\(p11kms_database_transaction_seconds_count\{",
                        e) for e in exprs), "database transactions: their rate by kind: %r" % exprs)
    p = by_title["Database failures by kind, and DependencyTimeoutException and "
                 "KMSInternalException answers"][0]
    exprs = [t["expr"] for t in p["targets"]]
    check(any(re.search(r"sum by \(kind\b.*\) \(rate\(p11kms_database_failures_total\{", e)
              for e in exprs), "database failures: their rate by kind: %r" % exprs)
    exprs = [t["expr"] for t in by_title["Key cache hit rate by node"][0]["targets"]]
    check(any(re.fullmatch(r'sum by \(instance\) \(rate\(p11kms_key_cache_lookups_total\{'
                           r'[^}]*,result="hit"\}\[[^]]*\]\)\) / sum by \(instance\) \(rate\('
                           r'p11kms_key_cache_lookups_total\{[^}]*\}\[[^]]*\]\)\)', e)
              and 'result="hit"}' not in e.split(" / ")[1] for e in exprs),
          "key cache hit rate: hits over all lookups, per node: %r" % exprs)


# ---- against a live server ----------------------------------------------------------


@test
def test_metric_names_exist():
    fams = live_families()
    names = sample_names(fams)
    used = 0
    for where, expr in queries():
        for m in METRIC_RE.finditer(expr):
            used += 1
            check(m.group(0) in names, "%s: %s is not a sample name of the live /metrics%s"
                  % (where, m.group(0), " (a histogram: use _bucket, _sum or _count)"
                     if m.group(0) in fams and fams[m.group(0)].type == "histogram" else ""))
        for m in SELECTOR_RE.finditer(expr):
            if not m.group(1).startswith("p11kms_"):
                check(m.group(1) in PROMETHEUS_SERIES,
                      "%s: %s is neither p11kmsd's nor Prometheus's" % (where, m.group(1)))
    check(used > 30, "%d metric names in the queries" % used)
    # Names in the annotations and descriptions are a family or a sample name.
    for where, text in prose():
        for m in METRIC_RE.finditer(text):
            check(m.group(0) in names or m.group(0) in fams,
                  "%s: %s is not in the live /metrics" % (where, m.group(0)))


@test
def test_database_and_key_cache_series():
    """The series the database and key cache panels and alerts read, on a live server: both
    kinds of transactions and of failures, both results of the cache's lookups."""
    live_families()
    parsed = C.parsed
    for kind in ("read", "write"):
        count = promtext.value(parsed, "p11kms_database_transaction_seconds_count", kind=kind)
        check(count > 0, "%s transactions counted: %r" % (kind, count))
        eq(promtext.value(parsed, "p11kms_database_transaction_seconds_bucket", kind=kind,
                          le="+Inf"), count, "%s transactions: the +Inf bucket" % kind)
        eq(promtext.value(parsed, "p11kms_database_failures_total", kind=kind), 0.0,
           "%s transactions the database failed" % kind)
    # P11kmsDatabaseSlow's threshold is a bucket's bound: a p99 above it means more than 1% of
    # the writes took longer, not an interpolation inside a wider bucket.
    slow = re.search(r"> (\S+)$", next(r["expr"] for r in alerts()
                                       if r["alert"] == "P11kmsDatabaseSlow").strip())
    check(slow, "P11kmsDatabaseSlow compares with a number")
    check(("p11kms_database_transaction_seconds_bucket",
           frozenset({"kind": "write", "le": slow.group(1)}.items())) in parsed,
          "P11kmsDatabaseSlow's threshold %s is a bucket's le" % slow.group(1))
    hits = promtext.value(parsed, "p11kms_key_cache_lookups_total", result="hit")
    misses = promtext.value(parsed, "p11kms_key_cache_lookups_total", result="miss")
    check(misses >= 1, "the key that does not exist was read from the database: %r misses"
          % misses)
    check(hits >= 2, "the cached keys and the key known not to exist: %r hits" % hits)


@test
def test_build_info_and_start_time():
    """p11kms_build_info names the release `p11kmsd --version` prints, with the value 1;
    p11kms_start_time_seconds is the server's start, between the test's clock before it
    started it and after it answered (the panel and P11kmsRestarting read its changes)."""
    fams = live_families()
    version = subprocess.run([os.environ["P11KMSD"], "--version"], stdout=subprocess.PIPE,
                             text=True, check=True, timeout=30).stdout.split()
    eq(len(version), 2, "p11kmsd --version prints its name and release: %r" % version)
    info = fams["p11kms_build_info"]
    eq(info.type, "gauge", "p11kms_build_info's type")
    eq([(x.labels, x.value) for x in info.samples], [({"version": version[1]}, 1.0)],
       "p11kms_build_info's one series")
    start = fams["p11kms_start_time_seconds"]
    eq(start.type, "gauge", "p11kms_start_time_seconds's type")
    eq(len(start.samples), 1, "p11kms_start_time_seconds's series")
    began = start.samples[0].value
    check(C.started[0] - 0.002 <= began <= C.started[1],
          "started at %.3f, between %.3f (before the start) and %.3f (ready)"
          % (began, C.started[0], C.started[1]))


@test
def test_selector_labels_exist():
    fams = live_families()
    names = sample_names(fams)
    for where, expr in queries():
        for m in SELECTOR_RE.finditer(expr):
            metric, body = m.group(1), m.group(2)
            matchers = MATCHER_RE.findall(body)
            eq(MATCHER_RE.sub("", body).strip(), "",
               "%s: the matchers of %s parse" % (where, metric))
            if metric in PROMETHEUS_SERIES:
                continue
            check(metric in names, "%s: %s is not in the live /metrics" % (where, metric))
            known = label_names(names[metric])
            for label in matchers:
                check(label in known, "%s: %s has no label %s (it has %s)"
                      % (where, metric, label, ", ".join(sorted(known))))


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
