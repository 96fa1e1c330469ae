// test/helpers/nss.ts against the real NSS softoken: a token it makes can be
// logged in to and holds a P-256 key pair in this process, a second token made
// while the library is up appears too, both survive a C_Finalize/C_Initialize
// (the vault's recycle), a separate process opens one with its standalone
// parameters, and cleanup leaves an empty slot and no database behind.
import { describe, it, expect, afterAll } from 'vitest';
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import pkcs11js from 'pkcs11js';
import { makeNssToken, nssLibraryParameters, type NssTestToken } from '../helpers/nss.js';

const P = pkcs11js;
const P256_OID = Buffer.from('06082a8648ce3d030107', 'hex');
const made: NssTestToken[] = [];
let p11: pkcs11js.PKCS11 | undefined;

function token(): NssTestToken {
  const t = makeNssToken();
  made.push(t);
  return t;
}

function lib(t: NssTestToken): pkcs11js.PKCS11 {
  if (!p11) {
    p11 = new P.PKCS11();
    p11.load(t.modulePath);
    p11.C_Initialize({ libraryParameters: t.libraryParameters, flags: P.CKF_OS_LOCKING_OK });
  }
  return p11;
}

afterAll(() => {
  for (const t of made) t.cleanup();
  if (p11) {
    p11.C_Finalize();
    p11.close();
  }
});

function slotOf(p: pkcs11js.PKCS11, label: string): Buffer | undefined {
  return p.C_GetSlotList(true).find((s) => p.C_GetTokenInfo(s).label.trim() === label);
}

function session(p: pkcs11js.PKCS11, t: NssTestToken): Buffer {
  const slot = slotOf(p, t.label);
  if (!slot) throw new Error(`no slot labelled ${t.label}`);
  return p.C_OpenSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION);
}

const codeOf = (f: () => unknown): number | undefined => {
  try {
    f();
    return 0;
  } catch (e) {
    return (e as { code?: number }).code;
  }
};

function generateP256(p: pkcs11js.PKCS11, s: Buffer, label: string): { privateKey: Buffer; publicKey: Buffer } {
  return p.C_GenerateKeyPair(
    s,
    { mechanism: P.CKM_EC_KEY_PAIR_GEN },
    [
      { type: P.CKA_TOKEN, value: true },
      { type: P.CKA_LABEL, value: label },
      { type: P.CKA_EC_PARAMS, value: P256_OID },
      { type: P.CKA_VERIFY, value: true },
    ],
    [
      { type: P.CKA_TOKEN, value: true },
      { type: P.CKA_PRIVATE, value: true },
      { type: P.CKA_SENSITIVE, value: true },
      { type: P.CKA_EXTRACTABLE, value: false },
      { type: P.CKA_LABEL, value: label },
      { type: P.CKA_SIGN, value: true },
    ],
  );
}

function findPrivate(p: pkcs11js.PKCS11, s: Buffer, label: string): Buffer[] {
  p.C_FindObjectsInit(s, [
    { type: P.CKA_CLASS, value: P.CKO_PRIVATE_KEY },
    { type: P.CKA_LABEL, value: label },
  ]);
  try {
    return p.C_FindObjects(s, 4);
  } finally {
    p.C_FindObjectsFinal(s);
  }
}

describe('makeNssToken', () => {
  it('gives a token this process can log in to and make a P-256 key pair on; a wrong PIN is refused', () => {
    const t = token();
    expect(existsSync(t.dir)).toBe(true);
    expect(t.libraryParameters).toBe(nssLibraryParameters());
    const p = lib(t);
    const s = session(p, t);
    expect(codeOf(() => p.C_Login(s, P.CKU_USER, `${t.pin}x`))).toBe(P.CKR_PIN_INCORRECT);
    p.C_Login(s, P.CKU_USER, t.pin);
    const kp = generateP256(p, s, 'bkv.helper.p256');
    const [point] = p.C_GetAttributeValue(s, kp.publicKey, [{ type: P.CKA_EC_POINT }]);
    // DER OCTET STRING around the 65-byte uncompressed point.
    expect(point?.value?.length).toBe(67);
    expect(point?.value?.subarray(2, 3)[0]).toBe(0x04);
    const [sensitive] = p.C_GetAttributeValue(s, kp.privateKey, [{ type: P.CKA_SENSITIVE }]);
    expect(sensitive?.value?.[0]).toBe(1);
    p.C_CloseSession(s);
  });

  it('a token made while the library is up appears at once, and both come back after C_Finalize/C_Initialize', () => {
    const [first] = made;
    if (!first) throw new Error('the first test makes the first token');
    const p = lib(first);
    const second = token();
    expect(second.label).not.toBe(first.label);
    expect(second.libraryParameters).toBe(first.libraryParameters);
    const s2 = session(p, second);
    p.C_Login(s2, P.CKU_USER, second.pin);
    generateP256(p, s2, 'bkv.helper.second');
    p.C_CloseSession(s2);

    // The vault's recycle: every token of the process is back under the one parameter string.
    p.C_Finalize();
    p.C_Initialize({ libraryParameters: first.libraryParameters, flags: P.CKF_OS_LOCKING_OK });
    for (const [t, label] of [
      [first, 'bkv.helper.p256'],
      [second, 'bkv.helper.second'],
    ] as const) {
      const s = session(p, t);
      p.C_Login(s, P.CKU_USER, t.pin);
      expect(findPrivate(p, s, label)).toHaveLength(1);
      p.C_CloseSession(s);
    }
  });

  it('a separate process opens the token alone with its standalone parameters', () => {
    const [first] = made;
    if (!first) throw new Error('the first test makes the first token');
    const pkcs11Path = createRequire(import.meta.url).resolve('pkcs11js');
    const child = `
      const P = require(${JSON.stringify(pkcs11Path)});
      const p = new P.PKCS11();
      p.load(process.env.MOD);
      p.C_Initialize({ libraryParameters: process.env.PARAMS });
      const slots = p.C_GetSlotList(true).filter((s) => p.C_GetTokenInfo(s).label.trim() === process.env.LABEL);
      const s = p.C_OpenSession(slots[0], P.CKF_SERIAL_SESSION);
      p.C_Login(s, P.CKU_USER, process.env.PIN);
      p.C_FindObjectsInit(s, [{ type: P.CKA_CLASS, value: P.CKO_PRIVATE_KEY }, { type: P.CKA_LABEL, value: 'bkv.helper.p256' }]);
      const found = p.C_FindObjects(s, 4).length;
      p.C_FindObjectsFinal(s);
      console.log(JSON.stringify({ slots: slots.length, found }));
      p.C_Finalize();`;
    const out = execFileSync(process.execPath, ['-e', child], {
      env: { ...first.env, MOD: first.modulePath, PARAMS: first.standaloneParameters, LABEL: first.label, PIN: first.pin },
      encoding: 'utf8',
    });
    expect(JSON.parse(out)).toEqual({ slots: 1, found: 1 });
  });

  it('cleanup deletes the database; the slot turns empty, now and after the next C_Initialize', () => {
    const [first] = made;
    if (!first) throw new Error('the first test makes the first token');
    const p = lib(first);
    const t = token();
    const s = session(p, t);
    p.C_Login(s, P.CKU_USER, t.pin);
    generateP256(p, s, 'bkv.helper.doomed');
    t.cleanup();
    made.splice(made.indexOf(t), 1);
    expect(existsSync(t.dir)).toBe(false);
    // The open session went with the database.
    expect(codeOf(() => p.C_GetSessionInfo(s))).toBe(P.CKR_SESSION_HANDLE_INVALID);
    const empty = (): void => {
      const slot = slotOf(p, t.label);
      if (!slot) throw new Error('the slot stays listed');
      const info = p.C_GetTokenInfo(slot);
      expect(info.flags & P.CKF_WRITE_PROTECTED).toBeTruthy();
      expect(info.flags & P.CKF_USER_PIN_INITIALIZED).toBe(0);
      const s2 = p.C_OpenSession(slot, P.CKF_SERIAL_SESSION);
      // No database, no user: NSS answers CKR_USER_TYPE_INVALID, not PIN_INCORRECT.
      expect(codeOf(() => p.C_Login(s2, P.CKU_USER, t.pin))).toBe(P.CKR_USER_TYPE_INVALID);
      p.C_CloseSession(s2);
    };
    empty();
    p.C_Finalize();
    p.C_Initialize({ libraryParameters: first.libraryParameters, flags: P.CKF_OS_LOCKING_OK });
    empty();
    // The other tokens are untouched.
    const s3 = session(p, first);
    p.C_Login(s3, P.CKU_USER, first.pin);
    expect(findPrivate(p, s3, 'bkv.helper.p256')).toHaveLength(1);
    p.C_CloseSession(s3);
  });
});
