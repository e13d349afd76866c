// The AWS SDK for JavaScript v3 (@aws-sdk/client-kms) on the command line, for the
// interop tests (tests/integration/test_interop_js.py). One JSON document on stdin:
//   {"endpoint": URL, "region": R, "accessKeyId": A, "secretAccessKey": S,
//    "retry": "default" | "off",           // "off": maxAttempts 1; "default": the SDK's own
//    "calls": [{"op": "GenerateDataKey", "input": {...}}, ...]}
// Binary members (Plaintext, CiphertextBlob, Message, Signature, Mac, PublicKey) go in and
// come out as standard base64;
// Date members come out as epoch seconds. Prints one JSON document:
//   {"results": [{"ok": OUTPUT, "attempts": N} | {"error": {name, status, fault, attempts,
//    message}}, ...]}
// Calls run one after another; a failed call does not stop the rest.
import * as kms from '@aws-sdk/client-kms';

const BINARY = new Set(['Plaintext', 'CiphertextBlob', 'Message', 'Signature', 'Mac', 'PublicKey']);

async function stdin() {
  const chunks = [];
  for await (const c of process.stdin) chunks.push(c);
  return Buffer.concat(chunks).toString('utf8');
}

function toInput(obj) {
  const out = {};
  for (const [k, v] of Object.entries(obj || {})) {
    out[k] = BINARY.has(k) && typeof v === 'string' ? Uint8Array.from(Buffer.from(v, 'base64')) : v;
  }
  return out;
}

function toJson(v) {
  if (v instanceof Uint8Array) return Buffer.from(v).toString('base64');
  if (v instanceof Date) return v.getTime() / 1000;
  if (Array.isArray(v)) return v.map(toJson);
  if (v && typeof v === 'object') {
    const out = {};
    for (const [k, x] of Object.entries(v)) if (k !== '$metadata' && x !== undefined) out[k] = toJson(x);
    return out;
  }
  return v;
}

const req = JSON.parse(await stdin());
const client = new kms.KMSClient({
  endpoint: req.endpoint,
  region: req.region,
  credentials: { accessKeyId: req.accessKeyId, secretAccessKey: req.secretAccessKey },
  ...(req.retry === 'off' ? { maxAttempts: 1 } : {}),
});
const results = [];
for (const call of req.calls) {
  const Command = kms[`${call.op}Command`];
  if (!Command) {
    console.error(`no such operation in @aws-sdk/client-kms: ${call.op}`);
    process.exit(2);
  }
  try {
    const out = await client.send(new Command(toInput(call.input)));
    results.push({ ok: toJson(out), attempts: out.$metadata.attempts, status: out.$metadata.httpStatusCode });
  } catch (e) {
    if (!e.$metadata) {
      console.error(`${call.op}: ${e.stack || e}`);
      process.exit(1);
    }
    results.push({ error: { name: e.name, status: e.$metadata.httpStatusCode, fault: e.$fault,
      attempts: e.$metadata.attempts, message: e.message } });
  }
}
client.destroy();
process.stdout.write(JSON.stringify({ results }) + '\n');
