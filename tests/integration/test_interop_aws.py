#!/usr/bin/python3
"""Debian's aws CLI and boto3 (old versions on purpose) against p11kmsd:
pagination of ListKeys, ListAliases and ListKeyRotations with Limit and
Marker, and the error type names and HTTP statuses of NotFound (404),
Disabled and invalid state (409), validation (400) and throttling (429),
through both clients. TAP output."""

import json
import os
import sys

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import boto3  # noqa: E402
import botocore  # noqa: E402

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test


class Ctx:
    ws = None
    server = None
    principal = None
    slow = None      # rate_crypto.slow = 0.01, burst 1: one call, then throttled for 100 s
    kms = None       # boto3 with retries off
    keys = []


C = Ctx()


def setup():
    C.ws = h.Workspace()
    C.principal = h.new_principal("interop")
    C.slow = h.new_principal("slow")
    token = h.make_token(C.ws.sub("token"), "p11kms-it-awsinterop")
    creds = h.write_credentials(C.ws.sub("credentials"), [C.principal, C.slow])
    config = h.write_config(C.ws.sub("p11kmsd.conf"), token, creds, max_on_demand_rotations="20",
                            **{"rate_crypto.slow": "0.01", "burst_crypto.slow": "1"})
    C.server = h.start_config_server(config, token, C.ws.sub("p11kmsd.log"))
    C.kms = h.kms_client(C.server.endpoint, C.principal)
    h.diag("aws CLI: %s; boto3 %s, botocore %s"
           % (h.aws(["--version"], {})[1].strip(), boto3.__version__, botocore.__version__))


def teardown():
    h.finish(T, C.ws, C.server)


def cli(who, *args):
    env = {"AWS_ACCESS_KEY_ID": who.access_key, "AWS_SECRET_ACCESS_KEY": who.secret,
           "AWS_DEFAULT_REGION": h.REGION, "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard",
           "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return h.aws(["kms", "--endpoint-url", C.server.endpoint, "--output", "json"] + list(args),
                 env)


def cli_error(who, *args):
    status, out, err = cli(who, *args)
    eq(status, 254, "aws %s: exit status (stderr %r)" % (args[0], err))
    return err


@test
def test_list_keys_and_aliases_page_by_page():
    for i in range(5):
        C.keys.append(C.kms.create_key(Description="page %d" % i)["KeyMetadata"]["KeyId"])
        C.kms.create_alias(AliasName="alias/page-%d" % i, TargetKeyId=C.keys[-1])
    pages, marker = [], None
    while True:
        kw = {"Limit": 2}
        if marker:
            kw["Marker"] = marker
        page = C.kms.list_keys(**kw)
        pages.append([k["KeyId"] for k in page["Keys"]])
        eq("NextMarker" in page, page["Truncated"], "NextMarker iff Truncated")
        if not page["Truncated"]:
            break
        marker = page["NextMarker"]
    eq([len(p) for p in pages], [2, 2, 1], "ListKeys pages of 2")
    eq(sorted(sum(pages, [])), sorted(C.keys), "the pages list every key once")
    paginated = [k["KeyId"] for p in C.kms.get_paginator("list_keys").paginate(
        PaginationConfig={"PageSize": 2}) for k in p["Keys"]]
    eq(paginated, sum(pages, []), "boto3's paginator walks the same pages")
    aliases = [a["AliasName"] for p in C.kms.get_paginator("list_aliases").paginate(
        PaginationConfig={"PageSize": 2}) for a in p["Aliases"]]
    eq(aliases, ["alias/page-%d" % i for i in range(5)], "ListAliases through the paginator")
    # the aws CLI pages on its own (--page-size sets Limit) and joins the pages
    status, out, err = cli(C.principal, "list-aliases", "--page-size", "2")
    eq(status, 0, "aws kms list-aliases (stderr %r)" % err)
    eq([a["AliasName"] for a in json.loads(out)["Aliases"]], aliases, "the CLI's joined pages")
    status, out, err = cli(C.principal, "list-keys", "--page-size", "1")
    eq(status, 0, "aws kms list-keys")
    eq(sorted(k["KeyId"] for k in json.loads(out)["Keys"]), sorted(C.keys), "list-keys")


@test
def test_list_key_rotations_page_by_page():
    key = C.keys[0]
    for _ in range(5):
        r = h.kms_call(C.server.endpoint, "RotateKeyOnDemand", {"KeyId": key}, C.principal)
        eq(r.status, 200, "RotateKeyOnDemand")
    pages, marker = [], None
    while True:
        body = {"KeyId": key, "Limit": 2}
        if marker:
            body["Marker"] = marker
        page = h.kms_call(C.server.endpoint, "ListKeyRotations", body, C.principal).json()
        pages.append(page["Rotations"])
        if not page["Truncated"]:
            check("NextMarker" not in page, "the last page has no NextMarker")
            break
        marker = page["NextMarker"]
    eq([len(p) for p in pages], [2, 2, 1], "ListKeyRotations pages of 2")
    eq({r["RotationType"] for p in pages for r in p}, {"ON_DEMAND"}, "rotation types")


@test
def test_error_names_and_statuses_through_boto3():
    missing = "0f0f0f0f-0000-4000-8000-000000000000"
    eq(h.client_error(C.kms.describe_key, KeyId=missing)[:2], ("NotFoundException", 404),
       "NotFound")
    key = C.keys[1]
    C.kms.disable_key(KeyId=key)
    eq(h.client_error(C.kms.encrypt, KeyId=key, Plaintext=b"x")[:2], ("DisabledException", 409),
       "Disabled")
    C.kms.enable_key(KeyId=key)
    C.kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    eq(h.client_error(C.kms.encrypt, KeyId=key, Plaintext=b"x")[:2],
       ("KMSInvalidStateException", 409), "pending deletion")
    C.kms.cancel_key_deletion(KeyId=key)
    C.kms.enable_key(KeyId=key)
    eq(h.client_error(C.kms.generate_data_key, KeyId=key, NumberOfBytes=1025)[:2],
       ("ValidationException", 400), "validation")
    slow = h.kms_client(C.server.endpoint, C.slow)
    slow.generate_random(NumberOfBytes=8)
    code, status, message = h.client_error(slow.generate_random, NumberOfBytes=8)
    eq((code, status, message), ("ThrottlingException", 429, "Rate exceeded"), "throttling")


@test
def test_error_names_and_statuses_through_the_cli():
    missing = "0f0f0f0f-0000-4000-8000-000000000000"
    err = cli_error(C.principal, "describe-key", "--key-id", missing)
    check("(NotFoundException)" in err, "NotFound: %r" % err)
    key = C.keys[2]
    C.kms.disable_key(KeyId=key)
    err = cli_error(C.principal, "encrypt", "--key-id", key, "--plaintext", "eA==")
    check("(DisabledException)" in err, "Disabled: %r" % err)
    C.kms.enable_key(KeyId=key)
    C.kms.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    err = cli_error(C.principal, "encrypt", "--key-id", key, "--plaintext", "eA==")
    check("(KMSInvalidStateException)" in err, "pending deletion: %r" % err)
    C.kms.cancel_key_deletion(KeyId=key)
    err = cli_error(C.principal, "generate-data-key", "--key-id", key, "--number-of-bytes",
                    "1025")
    check("(ValidationException)" in err, "validation: %r" % err)
    # the boto3 test spent the slow principal's one token
    err = cli_error(C.slow, "generate-random", "--number-of-bytes", "8")
    check("(ThrottlingException)" in err and "Rate exceeded" in err, "throttling: %r" % err)


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
