// The AWS Encryption SDK for JavaScript (@aws-crypto/client-node) with a KMS keyring whose
// clientProvider gives a KMS client (@aws-sdk/client-kms) pointed at p11kmsd, for the
// interop tests (tests/integration/test_interop_js.py). One JSON document on stdin:
//   {"endpoint": URL, "region": R, "accessKeyId": A, "secretAccessKey": S,
//    "op": "encrypt" | "decrypt",
//    "generatorKeyId": ID (encrypt), "keyIds": [ID, ...],
//    "context": {...} (encrypt: the encryption context; decrypt: pairs the message's context
//                      must hold, checked here after decrypting: error EncryptionContextMismatch),
//    "input": base64 (the plaintext, or the message to decrypt)}
// Prints {"output": base64, "context": the message's encryption context,
//         "keys": [{"providerId", "providerInfo"}] (its encrypted data keys),
//         "kms": [{"op", "KeyId", "context"}] (the KMS calls the keyring made, in order)}
// or, when the SDK refuses, {"error": {"name", "message", "status"}} (exit status 0).
import { buildClient, CommitmentPolicy, KmsKeyringNode } from '@aws-crypto/client-node';
import { KMS } from '@aws-sdk/client-kms';

async function stdin() {
  const chunks = [];
  for await (const c of process.stdin) chunks.push(c);
  return Buffer.concat(chunks).toString('utf8');
}

const req = JSON.parse(await stdin());
const calls = [];
const clients = [];
function clientProvider(region) {
  const client = new KMS({
    endpoint: req.endpoint,
    region,
    credentials: { accessKeyId: req.accessKeyId, secretAccessKey: req.secretAccessKey },
  });
  client.middlewareStack.add((next, context) => async (args) => {
    calls.push({ op: context.commandName.replace(/Command$/, ''), KeyId: args.input.KeyId,
      context: args.input.EncryptionContext });
    return next(args);
  }, { step: 'initialize', name: 'p11kmsRecordCalls' });
  clients.push(client);
  return client;
}

const { encrypt, decrypt } = buildClient(CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT);
const keyring = new KmsKeyringNode({ clientProvider, generatorKeyId: req.generatorKeyId,
  keyIds: req.keyIds || [] });
const input = Buffer.from(req.input, 'base64');
let out;
try {
  if (req.op === 'encrypt') {
    const { result, messageHeader } = await encrypt(keyring, input, { encryptionContext: req.context || {} });
    out = { output: result, header: messageHeader };
  } else if (req.op === 'decrypt') {
    const { plaintext, messageHeader } = await decrypt(keyring, input);
    // The JavaScript ESDK takes no expected context on decrypt; its documentation has the
    // caller compare the message's context, as done here.
    for (const [k, v] of Object.entries(req.context || {})) {
      if (messageHeader.encryptionContext[k] !== v) {
        const e = new Error(`encryption context: ${k} is not ${JSON.stringify(v)}`);
        e.name = 'EncryptionContextMismatch';
        throw e;
      }
    }
    out = { output: plaintext, header: messageHeader };
  } else {
    console.error('op must be encrypt or decrypt');
    process.exit(2);
  }
  process.stdout.write(JSON.stringify({
    output: Buffer.from(out.output).toString('base64'),
    context: out.header.encryptionContext,
    keys: out.header.encryptedDataKeys.map((k) => ({ providerId: k.providerId, providerInfo: k.providerInfo })),
    kms: calls,
  }) + '\n');
} catch (e) {
  process.stdout.write(JSON.stringify({ error: { name: e.name, message: e.message,
    status: e.$metadata ? e.$metadata.httpStatusCode : null }, kms: calls }) + '\n');
}
for (const c of clients) c.destroy();
