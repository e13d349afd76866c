#!/usr/bin/python3
"""Tags and paging against p11kmsd on a fresh SoftHSM2 token, through boto3
and the aws CLI unmodified, and raw signed requests where an SDK would refuse
to send what is tested: CreateKey's Tags, TagResource (replacing a value),
UntagResource (a tag the key lacks is no error), ListResourceTags; AWS's
limits with their exact error types and HTTP statuses (tag keys of 1-128 and
values of 0-256 characters counted as characters, not bytes; aws: reserved;
a tag key twice in one request; 50 tags per key; a key pending deletion);
kms:TagResource, kms:UntagResource and kms:ListResourceTags in key policies;
audit lines for tag changes; a destroyed key's tags gone from the database;
and paging walks, each item seen exactly once, by hand and with boto3's
paginators: 1,000 keys (ListKeys), 1,000 aliases (ListAliases), a key's 50
tags in pages of 7 (ListResourceTags), 1,000 on-demand rotations of one key
(ListKeyRotations; max_on_demand_rotations raised to allow them, AWS's own
limit is far lower). TAP output."""

import base64
import concurrent.futures
import json
import os
import sqlite3
import sys
import time

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

ARN_PREFIX = "arn:aws:kms:%s:%s:" % (h.REGION, h.ACCOUNT)
WALK = 1000
SETTINGS = {
    "day_seconds": "1",
    "pending_min_days": "1",
    "refresh_ms": "200",
    "max_on_demand_rotations": str(WALK),
    # A thousand CreateKey and RotateKeyOnDemand calls in a few seconds.
    "rate_manage": "0",
}


class Ctx:
    ws = None
    server = None
    alice = None
    bob = None
    kms = None
    config = None


C = Ctx()


def setup():
    C.ws = h.Workspace()
    C.alice = h.new_principal("alice")
    C.bob = h.new_principal("bob")
    token = h.make_token(C.ws.sub("token"), "p11kms-it-tags")
    creds = h.write_credentials(C.ws.sub("credentials"), [C.alice, C.bob])
    C.config = h.write_config(C.ws.sub("p11kmsd.conf"), token, creds, **SETTINGS)
    C.server = h.start_config_server(C.config, token, C.ws.sub("p11kmsd.log"))
    C.kms = h.kms_client(C.server.endpoint, C.alice)
    h.diag("p11kmsd serving %s" % C.server.endpoint)


def teardown():
    h.finish(T, C.ws, C.server)


def arn(key_id):
    return ARN_PREFIX + "key/" + key_id


def new_key(**kw):
    return C.kms.create_key(**kw)["KeyMetadata"]["KeyId"]


def tags_of(key_id, **kw):
    r = C.kms.list_resource_tags(KeyId=key_id, **kw)
    return [(t["TagKey"], t["TagValue"]) for t in r["Tags"]], r


def fails(op, body, error_type, status, principal=None):
    """A raw signed request that must fail with exactly this type and status."""
    r = h.kms_call(C.server.endpoint, op, body, principal or C.alice)
    if r.status == 200:
        raise AssertionError("%s %r succeeded; expected %s %d" % (op, body, error_type, status))
    return h.check_error_response(r, error_type, status)


def ok(op, body, principal=None):
    return h.kms_ok(C.server.endpoint, op, body, principal or C.alice)


def tag(k, v):
    return {"TagKey": k, "TagValue": v}


# ---- round trips ------------------------------------------------------------------


@test
def test_create_key_tags_round_trip():
    key = new_key(Description="tagged at birth",
                  Tags=[tag("team", "blue"), tag("Cost", ""), tag("été", "août")])
    got, r = tags_of(key)
    # byte order of the UTF-8 tag keys: upper case first, é after z
    eq(got, [("Cost", ""), ("team", "blue"), ("été", "août")], "CreateKey's tags")
    eq(r["Truncated"], False, "one page")
    check("NextMarker" not in r, "no NextMarker on the last page")
    # a key made without tags has none
    eq(tags_of(new_key())[0], [], "an untagged key's tags")


@test
def test_tag_untag_round_trip():
    key = new_key()
    eq(ok("TagResource", {"KeyId": key, "Tags": [tag("a", "1"), tag("b", "2")]}), {},
       "TagResource's answer")
    C.kms.tag_resource(KeyId=arn(key), Tags=[tag("b", "two"), tag("c", "3")])
    eq(tags_of(key)[0], [("a", "1"), ("b", "two"), ("c", "3")], "a tag key's value replaced")
    eq(ok("UntagResource", {"KeyId": key, "TagKeys": ["a", "missing"]}), {},
       "UntagResource's answer")
    eq(tags_of(arn(key))[0], [("b", "two"), ("c", "3")], "after UntagResource")
    # tag keys are case-sensitive
    C.kms.untag_resource(KeyId=key, TagKeys=["B", "C"])
    eq(tags_of(key)[0], [("b", "two"), ("c", "3")], "untag of other-case keys")
    C.kms.untag_resource(KeyId=key, TagKeys=["b", "c"])
    eq(tags_of(key)[0], [], "all untagged")
    # a disabled key is tagged as any other (AWS)
    C.kms.disable_key(KeyId=key)
    C.kms.tag_resource(KeyId=key, Tags=[tag("state", "disabled")])
    eq(tags_of(key)[0], [("state", "disabled")], "a disabled key's tags")


@test
def test_aws_cli():
    key = new_key()
    env = dict(os.environ, AWS_ACCESS_KEY_ID=C.alice.access_key,
               AWS_SECRET_ACCESS_KEY=C.alice.secret, AWS_DEFAULT_REGION=h.REGION)
    base = ["--endpoint-url", C.server.endpoint, "--output", "json", "kms"]
    rc, out, err = h.aws(base + ["tag-resource", "--key-id", key, "--tags",
                                 "TagKey=project,TagValue=zeus", "TagKey=env,TagValue=prod"], env)
    eq((rc, out.strip()), (0, ""), "aws kms tag-resource (stderr %r)" % err)
    rc, out, err = h.aws(base + ["list-resource-tags", "--key-id", key], env)
    eq(rc, 0, "aws kms list-resource-tags (stderr %r)" % err)
    eq(json.loads(out)["Tags"], [tag("env", "prod"), tag("project", "zeus")], "CLI's tags")
    rc, out, err = h.aws(base + ["untag-resource", "--key-id", key, "--tag-keys", "env"], env)
    eq(rc, 0, "aws kms untag-resource (stderr %r)" % err)
    rc, out, err = h.aws(base + ["list-resource-tags", "--key-id", key], env)
    eq(json.loads(out)["Tags"], [tag("project", "zeus")], "CLI's tags after untag")
    rc, out, err = h.aws(base + ["tag-resource", "--key-id", key, "--tags",
                                 "TagKey=aws:x,TagValue=y"], env)
    check(rc != 0 and "TagException" in err, "aws: prefix through the CLI: %d %r" % (rc, err))
    rc, out, err = h.aws(base + ["create-key", "--tags", "TagKey=made,TagValue=by-cli"], env)
    eq(rc, 0, "aws kms create-key --tags (stderr %r)" % err)
    made = json.loads(out)["KeyMetadata"]["KeyId"]
    eq(tags_of(made)[0], [("made", "by-cli")], "create-key --tags")


# ---- limits and errors --------------------------------------------------------------


@test
def test_lengths_count_characters():
    key = new_key()
    # 128 two-byte characters (256 bytes) is a valid key; 256 three-byte ones a valid value
    k128, v256 = "é" * 128, "€" * 256
    C.kms.tag_resource(KeyId=key, Tags=[tag(k128, v256), tag("empty", "")])
    eq(tags_of(key)[0], [("empty", ""), (k128, v256)], "longest key and value, empty value")
    doc = fails("TagResource", {"KeyId": key, "Tags": [tag("é" * 129, "v")]},
                "ValidationException", 400)
    check("tags.1.member.tagKey" in doc["message"] and "128" in doc["message"],
          "names the member and bound: %r" % doc["message"])
    doc = fails("TagResource", {"KeyId": key, "Tags": [tag("ok", "x"), tag("k", "€" * 257)]},
                "ValidationException", 400)
    check("tags.2.member.tagValue" in doc["message"] and "256" in doc["message"],
          "names the member and bound: %r" % doc["message"])
    fails("TagResource", {"KeyId": key, "Tags": [tag("", "v")]}, "ValidationException", 400)
    fails("TagResource", {"KeyId": key, "Tags": [{"TagKey": "k"}]}, "ValidationException", 400)
    fails("TagResource", {"KeyId": key, "Tags": [{"TagValue": "v"}]}, "ValidationException", 400)
    fails("TagResource", {"KeyId": key}, "ValidationException", 400)
    fails("TagResource", {"KeyId": key, "Tags": "k=v"}, "SerializationException", 400)
    fails("TagResource", {"KeyId": key, "Tags": [tag("k", 5)]}, "SerializationException", 400)
    fails("UntagResource", {"KeyId": key}, "ValidationException", 400)
    fails("UntagResource", {"KeyId": key, "TagKeys": ["é" * 129]}, "ValidationException", 400)
    fails("UntagResource", {"KeyId": key, "TagKeys": [""]}, "ValidationException", 400)
    # nothing was written by a refused request
    eq(tags_of(key)[0], [("empty", ""), (k128, v256)], "tags after the refusals")


@test
def test_reserved_and_duplicate_tag_keys():
    key = new_key()
    for k in ("aws:name", "AWS:name", "Aws:x", "aws:"):
        fails("TagResource", {"KeyId": key, "Tags": [tag("fine", "1"), tag(k, "v")]},
              "TagException", 400)
        fails("UntagResource", {"KeyId": key, "TagKeys": [k]}, "TagException", 400)
    code, status, _ = h.client_error(C.kms.create_key, Tags=[tag("aws:created", "x")])
    eq((code, status), ("TagException", 400), "CreateKey with an aws: tag")
    fails("TagResource", {"KeyId": key, "Tags": [tag("dup", "1"), tag("dup", "2")]},
          "TagException", 400)
    fails("UntagResource", {"KeyId": key, "TagKeys": ["dup", "dup"]}, "TagException", 400)
    code, status, _ = h.client_error(C.kms.create_key, Tags=[tag("d", "1"), tag("d", "1")])
    eq((code, status), ("TagException", 400), "CreateKey with a tag key twice")
    # "aws" without the colon, and aws: later in the key, are ordinary
    C.kms.tag_resource(KeyId=key, Tags=[tag("aws", "1"), tag("x-aws:y", "2")])
    eq(tags_of(key)[0], [("aws", "1"), ("x-aws:y", "2")], "tag keys like aws:")


@test
def test_fifty_tags_per_key():
    key = new_key()
    fifty = [tag("t%02d" % i, str(i)) for i in range(50)]
    C.kms.tag_resource(KeyId=key, Tags=fifty[:30])
    C.kms.tag_resource(KeyId=key, Tags=fifty[25:])  # five of them already there
    eq(len(tags_of(key)[0]), 50, "50 tags")
    # replacing values at 50 is no new tag
    C.kms.tag_resource(KeyId=key, Tags=[tag("t00", "new"), tag("t49", "new")])
    doc = fails("TagResource", {"KeyId": key, "Tags": [tag("t50", "one too many")]},
                "LimitExceededException", 400)
    check("50" in doc["message"], "says the limit: %r" % doc["message"])
    # the refused request changed nothing, not even the values it also replaced
    fails("TagResource", {"KeyId": key, "Tags": [tag("t01", "changed"), tag("t51", "x")]},
          "LimitExceededException", 400)
    got = dict(tags_of(key)[0])
    eq((len(got), got["t00"], got["t01"], got["t49"]), (50, "new", "1", "new"),
       "tags after the refused requests")
    code, status, _ = h.client_error(C.kms.create_key, Tags=[tag("c%02d" % i, "")
                                                              for i in range(51)])
    eq((code, status), ("LimitExceededException", 400), "CreateKey with 51 tags")
    made = new_key(Tags=[tag("c%02d" % i, "") for i in range(50)])
    eq(len(tags_of(made)[0]), 50, "CreateKey with 50 tags")


@test
def test_key_states_and_names():
    key = new_key(Tags=[tag("keep", "me")])
    C.kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=30)
    for op, body in (("TagResource", {"KeyId": key, "Tags": [tag("a", "b")]}),
                     ("UntagResource", {"KeyId": key, "TagKeys": ["keep"]})):
        doc = fails(op, body, "KMSInvalidStateException", 409)
        check("pending deletion" in doc["message"], "%s says why: %r" % (op, doc["message"]))
    # listing a key pending deletion is allowed (AWS)
    eq(tags_of(key)[0], [("keep", "me")], "a key pending deletion's tags")
    C.kms.cancel_key_deletion(KeyId=key)
    C.kms.tag_resource(KeyId=key, Tags=[tag("a", "b")])
    unknown = "00000000-0000-4000-8000-000000000000"
    for op, body in (("TagResource", {"KeyId": unknown, "Tags": [tag("a", "b")]}),
                     ("UntagResource", {"KeyId": unknown, "TagKeys": ["a"]}),
                     ("ListResourceTags", {"KeyId": unknown})):
        fails(op, body, "NotFoundException", 404)
    C.kms.create_alias(AliasName="alias/tagged", TargetKeyId=key)
    for ref in ("alias/tagged", ARN_PREFIX + "alias/tagged"):
        fails("TagResource", {"KeyId": ref, "Tags": [tag("a", "b")]}, "NotFoundException", 404)
        fails("ListResourceTags", {"KeyId": ref}, "NotFoundException", 404)
    fails("ListResourceTags", {"KeyId": "arn:aws:kms:%s:%s:thing/x" % (h.REGION, h.ACCOUNT)},
          "InvalidArnException", 400)


@test
def test_destroyed_key_tags_deleted():
    key = new_key(Tags=[tag("doomed", "yes"), tag("also", "this")])
    # day_seconds = 1, pending_min_days = 1: destroyed about a second from now
    C.kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=1)
    deadline = time.monotonic() + 30
    while not _gone(key) and time.monotonic() < deadline:
        time.sleep(0.3)
    code, status, _ = h.client_error(C.kms.list_resource_tags, KeyId=key)
    eq((code, status), ("NotFoundException", 404), "a destroyed key's ListResourceTags")
    db = sqlite3.connect("file:%s?mode=ro" % (C.config + ".db"), uri=True, timeout=30)
    try:
        rows = db.execute("SELECT count(*) FROM tags WHERE key_id = ?",
                          (bytes.fromhex(key.replace("-", "")),)).fetchone()[0]
        state = db.execute("SELECT state FROM keys WHERE id = ?",
                           (bytes.fromhex(key.replace("-", "")),)).fetchone()[0]
    finally:
        db.close()
    eq((state, rows), (3, 0), "the tombstone (state 3) keeps no tags rows")


def _gone(key):
    try:
        C.kms.describe_key(KeyId=key)
        return False
    except C.kms.exceptions.NotFoundException:
        return True


@test
def test_policy_actions():
    alice, bob = "arn:aws:iam::%s:user/alice" % h.ACCOUNT, "arn:aws:iam::%s:user/bob" % h.ACCOUNT
    policy = {"Version": "2012-10-17", "Statement": [
        {"Sid": "AliceAll", "Effect": "Allow", "Principal": {"AWS": alice}, "Action": "kms:*",
         "Resource": "*"},
        {"Sid": "BobReadsTags", "Effect": "Allow", "Principal": {"AWS": bob},
         "Action": "kms:ListResourceTags", "Resource": "*"},
        {"Sid": "BobTagsNotUntags", "Effect": "Allow", "Principal": {"AWS": bob},
         "Action": ["kms:TagResource"], "Resource": "*"},
    ]}
    key = new_key(Policy=json.dumps(policy), Tags=[tag("owner", "alice")])
    eq(ok("ListResourceTags", {"KeyId": key}, C.bob)["Tags"], [tag("owner", "alice")],
       "bob lists")
    ok("TagResource", {"KeyId": key, "Tags": [tag("by", "bob")]}, C.bob)
    fails("UntagResource", {"KeyId": key, "TagKeys": ["owner"]}, "AccessDeniedException", 400,
          C.bob)
    # a wildcard action names the three
    policy["Statement"][1]["Action"] = "kms:*Tag*"
    policy["Statement"].pop()
    C.kms.put_key_policy(KeyId=key, PolicyName="default", Policy=json.dumps(policy))
    ok("UntagResource", {"KeyId": key, "TagKeys": ["by"]}, C.bob)
    eq(tags_of(key)[0], [("owner", "alice")], "after bob's untag")
    policy["Statement"].pop()
    C.kms.put_key_policy(KeyId=key, PolicyName="default", Policy=json.dumps(policy))
    for op, body in (("TagResource", {"KeyId": key, "Tags": [tag("a", "b")]}),
                     ("UntagResource", {"KeyId": key, "TagKeys": ["owner"]}),
                     ("ListResourceTags", {"KeyId": key})):
        fails(op, body, "AccessDeniedException", 400, C.bob)


@test
def test_audit_lines():
    key = new_key()
    C.kms.tag_resource(KeyId=key, Tags=[tag("audited", "yes")])
    C.kms.untag_resource(KeyId=key, TagKeys=["audited"])
    ops = []
    with open(C.config + ".audit.log") as f:
        for line in f:
            d = json.loads(line)
            if d.get("type") == "intent" and d.get("key_arn") == arn(key):
                ops.append(d["operation"])
    eq(ops, ["CreateKey", "TagResource", "UntagResource"], "the key's intent lines")
    h.check_audit_changes([C.config + ".audit.log"], C.config + ".db")


# ---- paging -------------------------------------------------------------------------


def walk(op, result_key, item_key, limit, **kw):
    """Pages of op by hand: every page at most limit items, Truncated with a
    NextMarker on all but the last, which has neither; returns the items."""
    items, marker, pages = [], None, 0
    while True:
        args = dict(kw, Limit=limit)
        if marker is not None:
            args["Marker"] = marker
        page = getattr(C.kms, op)(**args)
        pages += 1
        check(len(page[result_key]) <= limit, "%s page of %d > Limit %d"
              % (op, len(page[result_key]), limit))
        items += [x[item_key] for x in page[result_key]]
        if not page["Truncated"]:
            check("NextMarker" not in page, "%s: no NextMarker on the last page" % op)
            return items, pages
        check(page[result_key], "%s: a truncated page is not empty" % op)
        marker = page["NextMarker"]
        check(isinstance(marker, str) and marker, "%s: NextMarker on a truncated page" % op)


def paginated(op, result_key, item_key, page_size, **kw):
    p = C.kms.get_paginator(op)
    return [x[item_key] for page in p.paginate(PaginationConfig={"PageSize": page_size}, **kw)
            for x in page[result_key]]


def once_each(items, expected, what):
    eq(len(items), len(set(items)), "%s: an item seen twice" % what)
    eq(sorted(items), sorted(expected), "%s: the items" % what)


@test
def test_walk_list_keys():
    before = set(paginated("list_keys", "Keys", "KeyId", 1000))
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        made = set(pool.map(lambda i: new_key(Description="walk %d" % i), range(WALK)))
    eq(len(made), WALK, "keys made")
    every = before | made
    items, pages = walk("list_keys", "Keys", "KeyId", 37)
    once_each(items, every, "ListKeys by hand")
    eq(pages, -(-len(every) // 37), "ListKeys pages of 37")
    eq(items, sorted(items), "ListKeys in key id order")
    once_each(paginated("list_keys", "Keys", "KeyId", 100), every, "ListKeys paginator")
    C.walk_keys = sorted(made)


@test
def test_walk_list_aliases():
    keys = C.walk_keys[:10]
    names = ["alias/walk-%04d" % i for i in range(WALK)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: C.kms.create_alias(AliasName=names[i],
                                                   TargetKeyId=keys[i % 10]), range(WALK)))
    every = set(paginated("list_aliases", "Aliases", "AliasName", 100))
    check(set(names) <= every, "every alias listed")
    items, pages = walk("list_aliases", "Aliases", "AliasName", 41)
    once_each(items, every, "ListAliases by hand")
    eq(items, sorted(items), "ListAliases in name order")
    # the default page is AWS's 50, the largest 100
    page = C.kms.list_aliases()
    eq((len(page["Aliases"]), page["Truncated"]), (50, True), "ListAliases' default Limit")
    eq(len(C.kms.list_aliases(Limit=100)["Aliases"]), 100, "ListAliases Limit 100")
    # one key's aliases: 100 of them, in pages of 9
    mine = [n for i, n in enumerate(names) if i % 10 == 0]
    items, _ = walk("list_aliases", "Aliases", "AliasName", 9, KeyId=keys[0])
    once_each(items, mine, "ListAliases of one key")
    once_each(paginated("list_aliases", "Aliases", "AliasName", 13, KeyId=keys[0]), mine,
              "ListAliases of one key, paginator")


@test
def test_walk_list_resource_tags():
    key = new_key()
    tags = [tag("k%02d-%s" % (i, "é" * (i % 3)), "v%d" % i) for i in range(50)]
    C.kms.tag_resource(KeyId=key, Tags=tags)
    items, pages = walk("list_resource_tags", "Tags", "TagKey", 7, KeyId=key)
    once_each(items, [t["TagKey"] for t in tags], "ListResourceTags by hand")
    eq(pages, 8, "50 tags in pages of 7")
    eq(items, sorted(items, key=lambda s: s.encode()), "tag-key byte order")
    once_each(paginated("list_resource_tags", "Tags", "TagKey", 7, KeyId=key),
              [t["TagKey"] for t in tags], "ListResourceTags paginator")
    # the default (and largest) page is all 50
    got, r = tags_of(key)
    eq((len(got), r["Truncated"]), (50, False), "ListResourceTags' default Limit")
    # a marker whose tag key went meanwhile: the page starts at the next one
    first = C.kms.list_resource_tags(KeyId=key, Limit=7)
    nxt = C.kms.list_resource_tags(KeyId=key, Limit=7, Marker=first["NextMarker"])["Tags"][0]
    C.kms.untag_resource(KeyId=key, TagKeys=[nxt["TagKey"]])
    after = C.kms.list_resource_tags(KeyId=key, Limit=7, Marker=first["NextMarker"])["Tags"]
    eq(after[0]["TagKey"], items[8], "the page after a removed marker tag")


def raw_walk(op, result_key, limit, **kw):
    """walk() over raw signed requests, for operations Debian's botocore (1.29)
    does not know (ListKeyRotations): returns the pages' items."""
    items, marker, pages = [], None, 0
    while True:
        body = dict(kw, Limit=limit)
        if marker is not None:
            body["Marker"] = marker
        page = ok(op, body)
        pages += 1
        check(len(page[result_key]) <= limit, "%s page over Limit" % op)
        items += page[result_key]
        if not page["Truncated"]:
            check("NextMarker" not in page, "%s: no NextMarker on the last page" % op)
            return items, pages
        check(page[result_key], "%s: a truncated page is not empty" % op)
        marker = page["NextMarker"]
        check(isinstance(marker, str) and marker, "%s: NextMarker on a truncated page" % op)


@test
def test_walk_list_key_rotations():
    """Debian's botocore has neither RotateKeyOnDemand nor ListKeyRotations (so
    no paginator for it): raw signed requests, the protocol boto3 would speak."""
    key = new_key()
    t0 = time.monotonic()
    for _ in range(WALK):
        eq(ok("RotateKeyOnDemand", {"KeyId": key}), {"KeyId": arn(key)}, "RotateKeyOnDemand")
    h.diag("%d on-demand rotations in %.1f s" % (WALK, time.monotonic() - t0))
    fails("RotateKeyOnDemand", {"KeyId": key}, "LimitExceededException", 400)
    page = ok("ListKeyRotations", {"KeyId": key})
    eq((len(page["Rotations"]), page["Truncated"]), (100, True), "the default Limit is 100")
    whole, pages = raw_walk("ListKeyRotations", "Rotations", 1000, KeyId=key)
    eq((len(whole), pages), (WALK, 1), "ListKeyRotations, one page of 1000")
    check(all(r["RotationType"] == "ON_DEMAND" and r["KeyId"] == arn(key) for r in whole),
          "every rotation is the key's, on demand")
    dates = [r["RotationDate"] for r in whole]
    eq(dates, sorted(dates), "rotations in order")
    # rotations carry no id of their own: a walk is exact when its pages put
    # together are the one page of 1000, item for item
    for size in (77, 33, 999):
        items, pages = raw_walk("ListKeyRotations", "Rotations", size, KeyId=key)
        eq((items, pages), (whole, -(-WALK // size)), "ListKeyRotations in pages of %d" % size)


@test
def test_paging_errors():
    key = new_key(Tags=[tag("a", "1"), tag("b", "2")])
    cases = [
        ("ListKeys", {}, (0, 1001)),
        ("ListAliases", {}, (0, 101)),
        ("ListKeyRotations", {"KeyId": key}, (0, 1001)),
        ("ListResourceTags", {"KeyId": key}, (0, 51)),
    ]
    for op, base, (low, high) in cases:
        for limit, bound in ((low, "greater than or equal to 1"),
                             (high, "less than or equal to %d" % (high - 1))):
            doc = fails(op, dict(base, Limit=limit), "ValidationException", 400)
            check(bound in doc["message"], "%s Limit %d: %r" % (op, limit, doc["message"]))
        ok(op, dict(base, Limit=high - 1))
        # AWS's MarkerType: 1-1024 characters of U+0020..U+00FF
        fails(op, dict(base, Marker=""), "ValidationException", 400)
        fails(op, dict(base, Marker="m" * 1025), "ValidationException", 400)
        fails(op, dict(base, Marker="\u0100"), "ValidationException", 400)
        fails(op, dict(base, Marker="tab\there"), "ValidationException", 400)
    bad = {
        "ListKeys": ["garbage", "00000000-0000-0000-0000-00000000000g", "ÿ" * 36],
        "ListAliases": ["garbage", "alias/", "alias/aws/x", "a" * 300],
        "ListKeyRotations": ["1", "0", "abc", "-2", "+5", " 5", "4294967296", "2x"],
        "ListResourceTags": ["not base64!", base64.b64encode(b"\xff\xfe").decode(),
                             base64.b64encode(("x" * 129).encode()).decode(),
                             base64.b64encode(b"a\x00b").decode()],
    }
    for op, base, _ in cases:
        for marker in bad[op]:
            doc = fails(op, dict(base, Marker=marker), "InvalidMarkerException", 400)
            eq(doc["message"], "Marker is not valid", "%s Marker %r" % (op, marker[:20]))
    # a marker naming a tag key past the last: an empty last page
    r = ok("ListResourceTags", {"KeyId": key, "Marker": base64.b64encode(b"zzz").decode()})
    eq((r["Tags"], r["Truncated"], "NextMarker" in r), ([], False, False), "past the end")


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
