#!/usr/bin/python3
"""Writes a wrk Lua script that replays one SigV4-signed p11kms request.

usage: . STATE/env; bench/presign.py OPERATION 'JSON BODY' > req.lua
       wrk -t2 -c32 -d10s --latency -s req.lua "$AWS_ENDPOINT_URL/"

The signature stays valid for the server's 5-minute window, so run wrk within
it. Needs Debian's python3-botocore (pulled in by python3-boto3).
"""
import json
import os
import sys

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    operation, body = sys.argv[1], sys.argv[2]
    json.loads(body)  # refuse a body that is not JSON before signing it
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    region = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    creds = Credentials(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
    req = AWSRequest(method="POST", url=endpoint + "/", data=body,
                     headers={"X-Amz-Target": "TrentService." + operation,
                              "Content-Type": "application/x-amz-json-1.1"})
    SigV4Auth(creds, "kms", region).add_auth(req)
    print('wrk.method = "POST"')
    print("wrk.body = %s" % json.dumps(body))
    for name, value in req.headers.items():
        if name.lower() not in ("host", "content-length"):
            print("wrk.headers[%s] = %s" % (json.dumps(name), json.dumps(value)))


if __name__ == "__main__":
    main()
