// The `jose` package (npm) on the command line, for the interop tests:
//   node jose_tool.mjs open KEYHEX < token          prints the payload (base64) and the header
//   node jose_tool.mjs seal KEYHEX HEADERJSON < payload   prints a compact JWE
// KEYHEX is the 32-byte data key; alg "dir", enc "A256GCM".
import { compactDecrypt, CompactEncrypt } from 'jose';

async function stdin() {
  const chunks = [];
  for await (const c of process.stdin) chunks.push(c);
  return Buffer.concat(chunks);
}

const [cmd, keyHex, headerJson] = process.argv.slice(2);
const key = Uint8Array.from(Buffer.from(keyHex || '', 'hex'));
if (key.length !== 32) {
  console.error('KEYHEX must be 32 bytes');
  process.exit(2);
}
const input = await stdin();
try {
  if (cmd === 'open') {
    const { plaintext, protectedHeader } = await compactDecrypt(input.toString().trim(), key);
    process.stdout.write(JSON.stringify({
      payload: Buffer.from(plaintext).toString('base64'),
      header: protectedHeader,
    }) + '\n');
  } else if (cmd === 'seal') {
    const jwe = await new CompactEncrypt(input)
      .setProtectedHeader(JSON.parse(headerJson))
      .encrypt(key);
    process.stdout.write(jwe + '\n');
  } else {
    console.error('usage: jose_tool.mjs open|seal KEYHEX [HEADERJSON]');
    process.exit(2);
  }
} catch (e) {
  console.error(`${e.code || 'error'}: ${e.message}`);
  process.exit(1);
}
