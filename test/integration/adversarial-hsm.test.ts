// HSM faults. Requests fail closed with HSM_UNAVAILABLE, nothing is half
// applied (no counted attempt without an answer, no record without its
// anchor), and service resumes by itself when the HSM does.
//
// Three seams, each next to the real thing:
// - real SoftHSM2 faults: every session closed under the vault's feet
//   (C_CloseAllSessions) and the login lost (C_Logout);
// - a test double at the pkcs11js seam (the Token's module object): calls fail
//   with CKR_DEVICE_ERROR for a while, or a session handle goes stale once;
// - a test double at the VaultKeys seam: one HSM operation (or all) fails for
//   a while, at every step of every flow.
import { describe, it, expect, afterAll } from 'vitest';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pkcs11js from 'pkcs11js';
import { captureLog, tempVault, TEST_KDF, type TestVault } from '../helpers/vault.js';
import { TEST_MODULE, hsmOf, makeToken } from '../helpers/softhsm.js';
import { CALLER, enroll, recover, beginOnly, secretsSeen } from '../helpers/flows.js';
import { LeakScan, codeOf, stateDigest } from '../helpers/adversarial.js';
import { openKeys, openWorkerKeys, selfTest } from '../../vault/core/open.js';
import { Vault } from '../../vault/core/vault.js';
import { Store } from '../../vault/store/index.js';
import type { VaultKeys } from '../../vault/hsm/vault-keys.js';
import { decorateKeys } from '../../vault/hsm/decorate.js';
import { ErrorCodes, VaultError } from '../../protocol/errors.js';

const leaks = new LeakScan();
const key = () => new Uint8Array(randomBytes(32));

/** The VaultKeys seam: a real key set whose operations can be made to fail for a while. */
class FlakyKeys {
  down = false;
  only: Set<string> | undefined;
  failures = 0;
  /** When set, a failing call waits for it before it fails (a slow HSM timing out). */
  hold: Promise<void> | undefined;
  calls: Record<string, number> = {};
  constructor(readonly real: VaultKeys) {}
  wrap(): VaultKeys {
    return decorateKeys(this.real, (op, call) => {
      this.calls[op] = (this.calls[op] ?? 0) + 1;
      const failing = this.down && op !== 'close' && (!this.only || this.only.has(op));
      if (op === 'ping') return failing ? Promise.resolve(false) : call();
      if (failing) {
        this.failures++;
        const err = new VaultError(ErrorCodes.HSM_UNAVAILABLE, `HSM unavailable during ${op} (0x30)`);
        return this.hold ? this.hold.then(() => Promise.reject(err)) : Promise.reject(err);
      }
      return call();
    });
  }
}

/** A vault on a real token and database, with the VaultKeys double in front of the real keys. */
async function flakyVault(workers = false) {
  const token = makeToken();
  const dir = mkdtempSync(join(tmpdir(), 'bkv-hsmfault-'));
  const dbPath = join(dir, 'vault.db');
  const logs: string[] = [];
  const log = captureLog(logs);
  const hsm = hsmOf(token);
  const real = workers ? await openWorkerKeys(hsm, true, log, { threads: 1 }) : openKeys(hsm, true, log);
  await selfTest(real);
  const flaky = new FlakyKeys(real);
  const store = new Store(dbPath);
  let vault = await Vault.open(flaky.wrap(), store, log, { kdfFloor: TEST_KDF });
  leaks.text('fault log', () => logs);
  leaks.secret('fault PIN', token.pin);
  return {
    flaky,
    label: token.label,
    token,
    dbPath,
    logs,
    get vault() {
      return vault;
    },
    /** Close and open again on the same token and database (what a restart does). */
    async restart() {
      vault.close();
      vault.store.close();
      vault = await Vault.open(flaky.wrap(), new Store(dbPath), log, { kdfFloor: TEST_KDF });
      return vault;
    },
    async close() {
      vault.close();
      vault.store.close();
      await real.close();
      leaks.file('fault database', () => dbPath);
      const r = leaks.scan();
      expect(r.hits).toEqual([]);
      rmSync(dir, { recursive: true, force: true });
      token.cleanup();
    },
  };
}

afterAll(() => {
  for (const s of secretsSeen) leaks.secret('flow secret', s);
  const r = leaks.scan();
  console.log(`hsm leak scan: ${r.secrets} secrets x ${r.places} places (${r.bytes} bytes)`);
  expect(r.hits).toEqual([]);
});

describe('the HSM failing calls for a while (VaultKeys seam)', () => {
  const OPS = ['oprfEvaluate', 'makeVerifier', 'seal', 'checkVerifier', 'unseal'] as const;

  it.each(OPS)('%s failing: every step that needs it answers HSM_UNAVAILABLE and changes nothing; service resumes', async (op) => {
    const f = await flakyVault();
    try {
      const v = () => f.vault;
      await enroll(v(), 'amy', 'pw-amy-1', key());
      await enroll(v(), 'ned', 'pw-ned-1', key());
      const { startOprf, enrollPayload } = await import('../../client/protocol.js');
      // Each step is one core call, prepared (outside the outage) up to the call itself.
      const steps: { name: string; prepare: () => Promise<() => Promise<unknown>> }[] = [
        { name: 'enroll.begin', prepare: async () => () => v().enrollBegin(CALLER, 'zoe', startOprf(v().vaultId, 'zoe', 'pw-zoe-1').blinded) },
        {
          name: 'enroll.finish',
          prepare: async () => {
            const p = startOprf(v().vaultId, 'yan', 'pw-yan-1');
            const b = await v().enrollBegin(CALLER, 'yan', p.blinded);
            const payload = await enrollPayload(p, b.evaluated, TEST_KDF, key());
            secretsSeen.push(payload.authKey);
            return () => v().enrollFinish(CALLER, b.sessionId, 'yan', payload);
          },
        },
        { name: 'recover.begin', prepare: async () => () => v().recoverBegin(CALLER, 'amy', startOprf(v().vaultId, 'amy', 'pw-amy-1').blinded) },
        {
          name: 'recover.finish (right)',
          prepare: async () => {
            const b = await beginOnly(v(), 'amy', 'pw-amy-1');
            return () => v().recoverFinish(CALLER, b.sessionId, b.authKey);
          },
        },
        {
          name: 'recover.finish (wrong)',
          prepare: async () => {
            const b = await beginOnly(v(), 'amy', 'not-amy');
            return () => v().recoverFinish(CALLER, b.sessionId, b.authKey);
          },
        },
        { name: 'record.delete', prepare: async () => () => v().delete('ned') },
      ];
      f.flaky.only = new Set([op]);
      let hit = 0;
      for (const step of steps) {
        const call = await step.prepare();
        const before = stateDigest(f.dbPath);
        const attempts = v().status('amy').attemptsLeft;
        f.flaky.down = true;
        const failuresBefore = f.flaky.failures;
        const code = await codeOf(call);
        f.flaky.down = false;
        if (f.flaky.failures === failuresBefore) continue; // this step does not use the failing operation
        hit++;
        // It failed closed and left no trace: no record, counter or anchor change, nothing unanchored.
        expect(code, `${step.name} with ${op} down`).toBe(ErrorCodes.HSM_UNAVAILABLE);
        expect(stateDigest(f.dbPath), `${step.name} with ${op} down`).toEqual(before);
        expect(v().ledger.status().seq, step.name).toBe(v().ledger.status().anchored);
        expect(v().status('amy').attemptsLeft, step.name).toBe(attempts);
        // The HSM is back: the same call works (a finish's session survived), or the flow restarts cleanly.
        const again = await codeOf(call);
        if (again === ErrorCodes.SESSION_NOT_FOUND) expect(await codeOf(async () => (await step.prepare())())).toBe('NO_ERROR');
        else expect(again, `${step.name} retried after ${op} came back`).toBe('NO_ERROR');
      }
      expect(hit).toBeGreaterThan(0);
      // A restart finds a database that matches the anchor exactly (nothing unanchored left behind).
      const amy = v().status('amy');
      const w = await f.restart();
      expect(w.status('amy')).toEqual(amy);
      expect(f.logs.some((l) => l.includes('state.recovered'))).toBe(false);
      expect((await recover(w, 'amy', 'pw-amy-1')).outcome).toBe('ok');
    } finally {
      await f.close();
    }
  });

  it('the anchor write failing: HSM_UNAVAILABLE, nothing revealed, nothing changed, and a user retrying through it loses no attempt', async () => {
    const f = await flakyVault();
    try {
      await enroll(f.vault, 'kim', 'pw-kim-1', key());
      await enroll(f.vault, 'ken', 'pw-ken-1', key());
      // The token's storage fails (label writes fail) while key operations still work.
      f.flaky.only = new Set(['writeAnchor']);
      f.flaky.down = true;
      for (let i = 0; i < 15; i++) expect(await codeOf(recover(f.vault, 'kim', 'pw-kim-1'))).toBe(ErrorCodes.HSM_UNAVAILABLE);
      expect(await codeOf(f.vault.delete('ken'))).toBe(ErrorCodes.HSM_UNAVAILABLE);
      expect(await codeOf(enroll(f.vault, 'kat', 'pw-kat-1', key()))).toBe(ErrorCodes.HSM_UNAVAILABLE);
      f.flaky.down = false;
      // Fifteen tries, no attempt spent: each begin's count was undone before its HSM_UNAVAILABLE
      // (before issue 15 the first stayed committed and was anchored once the HSM was back).
      expect(f.vault.status('kim')).toMatchObject({ state: 'active', attemptsLeft: 10 });
      expect(f.vault.status('ken').state).toBe('active');
      expect(f.vault.status('kat').state).toBe('absent');
      expect((await recover(f.vault, 'kim', 'pw-kim-1')).outcome).toBe('ok');
      expect(f.vault.status('kim').attemptsLeft).toBe(10);
      // Everything committed is anchored now, and a restart agrees with it.
      expect(f.vault.ledger.status().seq).toBe(f.vault.ledger.status().anchored);
      const before = { kim: f.vault.status('kim'), ken: f.vault.status('ken'), kat: f.vault.status('kat') };
      const v = await f.restart();
      expect({ kim: v.status('kim'), ken: v.status('ken'), kat: v.status('kat') }).toEqual(before);
    } finally {
      await f.close();
    }
  });

  // docs/SECURITY.md F5 (closed by issue 15): the change of a request whose anchor write
  // fails is undone before the caller hears HSM_UNAVAILABLE, "retryable, nothing changed".
  // Before the fix it stayed committed and the next successful write anchored it.
  it('an enrolment whose anchor write fails leaves no trace', async () => {
    const f = await flakyVault();
    try {
      await enroll(f.vault, 'gil', 'pw-gil-1', key());
      const { startOprf, enrollPayload } = await import('../../client/protocol.js');
      const p = startOprf(f.vault.vaultId, 'gap', 'pw-gap-1');
      const b = await f.vault.enrollBegin(CALLER, 'gap', p.blinded);
      const payload = await enrollPayload(p, b.evaluated, TEST_KDF, key());
      secretsSeen.push(payload.authKey);
      // The batch number moves on (the undo is a batch of its own); records, buckets and root do not.
      const before = stateDigest(f.dbPath, { logical: true });
      f.flaky.only = new Set(['writeAnchor']);
      f.flaky.down = true;
      expect(await codeOf(f.vault.enrollFinish(CALLER, b.sessionId, 'gap', payload))).toBe(ErrorCodes.HSM_UNAVAILABLE);
      expect(f.vault.status('gap').state).toBe('absent');
      expect(stateDigest(f.dbPath, { logical: true })).toEqual(before);
      expect(before.records).toBe(1);
      // A crash now: the start-up repair undoes the undo and then the enrolment, to the anchor it finds.
      const v = await f.restart();
      expect(v.status('gap').state).toBe('absent');
      f.flaky.down = false;
      // The HSM is back: the undo is anchored like any batch, and the user enrols afresh.
      await enroll(v, 'gap', 'pw-gap-1', key());
      expect(v.status('gap')).toMatchObject({ state: 'active', attemptsLeft: 10 });
      expect((await recover(v, 'gil', 'pw-gil-1')).outcome).toBe('ok');
      expect(v.ledger.status().seq).toBe(v.ledger.status().anchored);
    } finally {
      await f.close();
    }
  });

  it('requests that commit while a failing anchor write is pending are undone with it, and told so', async () => {
    const f = await flakyVault();
    try {
      await enroll(f.vault, 'kim', 'pw-kim-1', key());
      await enroll(f.vault, 'ken', 'pw-ken-1', key());
      const before = stateDigest(f.dbPath, { logical: true });
      let release!: () => void;
      f.flaky.hold = new Promise((r) => (release = r));
      f.flaky.only = new Set(['writeAnchor']);
      f.flaky.down = true;
      // The delete's batch reaches the (slow, failing) anchor write; the recovery's count
      // commits meanwhile into the next batch, on top of the state about to be undone.
      const del = codeOf(f.vault.delete('ken'));
      await new Promise((r) => setTimeout(r, 20));
      const rec = codeOf(recover(f.vault, 'kim', 'pw-kim-1'));
      await new Promise((r) => setTimeout(r, 50));
      release();
      expect(await del).toBe(ErrorCodes.HSM_UNAVAILABLE);
      expect(await rec).toBe(ErrorCodes.HSM_UNAVAILABLE);
      f.flaky.down = false;
      f.flaky.hold = undefined;
      expect(stateDigest(f.dbPath, { logical: true })).toEqual(before);
      expect(f.vault.status('ken').state).toBe('active');
      expect(f.vault.status('kim').attemptsLeft).toBe(10);
      // And after the outage both work, and a restart agrees.
      expect((await recover(f.vault, 'kim', 'pw-kim-1')).outcome).toBe('ok');
      await f.vault.delete('ken');
      const v = await f.restart();
      expect(v.status('ken').state).toBe('deleted');
      expect(v.status('kim')).toMatchObject({ state: 'active', attemptsLeft: 10 });
    } finally {
      await f.close();
    }
  });

  it('everything down: fail closed, pending guesses survive, and the first request after the outage works', async () => {
    const f = await flakyVault();
    try {
      await enroll(f.vault, 'lou', 'pw-lou-1', key());
      const pending = await beginOnly(f.vault, 'lou', 'pw-lou-1');
      f.flaky.only = undefined;
      f.flaky.down = true;
      expect(await f.vault.keys.ping()).toBe(false);
      const codes = new Set<string>();
      for (let i = 0; i < 20; i++) {
        codes.add(await codeOf(recover(f.vault, 'lou', i % 2 ? 'pw-lou-1' : 'wrong')));
        codes.add(await codeOf(enroll(f.vault, `new-${i}`, 'pw-new-1', key())));
      }
      // The pending recovery's finish fails closed, and stays finishable.
      codes.add(await codeOf(f.vault.recoverFinish(CALLER, pending.sessionId, pending.authKey)));
      expect([...codes]).toEqual([ErrorCodes.HSM_UNAVAILABLE]);
      f.flaky.down = false;
      expect(await f.vault.keys.ping()).toBe(true);
      const r = await f.vault.recoverFinish(CALLER, pending.sessionId, pending.authKey);
      expect(r.outcome).toBe('ok');
      expect(f.vault.status('lou').attemptsLeft).toBe(10);
      expect(f.vault.status('new-0').state).toBe('absent');
    } finally {
      await f.close();
    }
  });
});

describe('the pkcs11js seam (Token on the main thread)', () => {
  let t: TestVault;
  afterAll(() => t?.close());

  /** The Token's module object, whose calls the double intercepts. */
  function p11Of(v: TestVault): pkcs11js.PKCS11 & Record<string, unknown> {
    const token = (v.vault.keys as unknown as { port?: { token?: { p11?: pkcs11js.PKCS11 } } }).port?.token;
    if (!token?.p11) throw new Error('the keys no longer keep their Token as .port.token, or it no longer keeps its module object as .p11: update this test double');
    return token.p11 as pkcs11js.PKCS11 & Record<string, unknown>;
  }

  function intercept(p11: pkcs11js.PKCS11 & Record<string, unknown>, fail: (name: string) => number | undefined): () => void {
    const saved: [string, unknown][] = [];
    for (const name of ['C_DeriveKey', 'C_SignInit', 'C_Sign', 'C_VerifyInit', 'C_Verify', 'C_EncryptInit', 'C_Encrypt', 'C_DecryptInit', 'C_Decrypt', 'C_SetAttributeValue', 'C_GetAttributeValue', 'C_GenerateRandom', 'C_OpenSession', 'C_GetSessionInfo']) {
      const real = p11[name] as (...a: unknown[]) => unknown;
      saved.push([name, real]);
      p11[name] = (...a: unknown[]) => {
        const code = fail(name);
        if (code !== undefined) throw Object.assign(new Error(`CKR_${code}`), { code });
        return real.apply(p11, a);
      };
    }
    return () => saved.forEach(([n, f]) => (p11[n] = f));
  }

  it('CKR_DEVICE_ERROR for a while: HSM_UNAVAILABLE, no change, resumes by itself', async () => {
    t = await tempVault();
    await enroll(t.vault, 'dev', 'pw-dev-1', key());
    const before = stateDigest(t.dbPath);
    const restore = intercept(p11Of(t), () => 0x30);
    try {
      // (A delete fails at its anchor write, after its commit: the known gap tested above.)
      for (const call of [() => recover(t.vault, 'dev', 'pw-dev-1'), () => enroll(t.vault, 'dev2', 'pw', key())]) {
        expect(await codeOf(call)).toBe(ErrorCodes.HSM_UNAVAILABLE);
      }
      expect(await t.vault.keys.ping()).toBe(false);
    } finally {
      restore();
    }
    expect(stateDigest(t.dbPath)).toEqual(before);
    expect(await t.vault.keys.ping()).toBe(true);
    expect((await recover(t.vault, 'dev', 'pw-dev-1')).outcome).toBe('ok');
  });

  it('a session handle that goes stale once is replaced transparently', async () => {
    let once = true;
    const restore = intercept(p11Of(t), (name) => {
      // The verifier check's first call: C_VerifyInit, or C_SignInit where the module's
      // C_Verify cannot be trusted with a mismatch (NSS; ModuleQuirks.verify 'sign-compare').
      if (once && name === (TEST_MODULE === 'nss' ? 'C_SignInit' : 'C_VerifyInit')) {
        once = false;
        return 0xb3; // CKR_SESSION_HANDLE_INVALID
      }
      return undefined;
    });
    try {
      expect((await recover(t.vault, 'dev', 'pw-dev-1')).outcome).toBe('ok');
      expect(once).toBe(false);
    } finally {
      restore();
    }
  });
});

describe(`real ${TEST_MODULE === 'nss' ? 'NSS softoken' : 'SoftHSM2'} faults`, () => {
  for (const workers of [false, true]) {
    describe(workers ? 'HSM worker threads' : 'main-thread Token', () => {
      it('every session closed under the vault mid-request, and the login lost: fail closed, then resume by itself', async () => {
        const f = await flakyVault(workers);
        try {
          await enroll(f.vault, 'sue', 'pw-sue-1', key());
          await enroll(f.vault, 'tom', 'pw-tom-1', key());
          const p11 = new pkcs11js.PKCS11();
          p11.load(f.token.modulePath);
          try {
            p11.C_Initialize({ flags: pkcs11js.CKF_OS_LOCKING_OK, ...(f.token.libraryParameters ? { libraryParameters: f.token.libraryParameters } : {}) });
          } catch {
            /* already initialised in this process: the same library state */
          }
          const slot = p11.C_GetSlotList(true).find((s) => p11.C_GetTokenInfo(s).label.trim() === f.label)!;
          const codes: string[] = [];
          // Mid-request: the sessions vanish between the OPRF evaluation and the anchor write of a recovery.
          const real = f.flaky.real;
          const origWrite = real.writeAnchor.bind(real);
          real.writeAnchor = async (a) => {
            real.writeAnchor = origWrite;
            p11.C_CloseAllSessions(slot);
            return origWrite(a);
          };
          codes.push(await codeOf(recover(f.vault, 'sue', 'pw-sue-1')));
          // Login lost: one C_Logout ends it for every session of the process.
          const s = p11.C_OpenSession(slot, pkcs11js.CKF_SERIAL_SESSION | pkcs11js.CKF_RW_SESSION);
          try {
            p11.C_Logout(s);
          } catch {
            /* already logged out by the close above */
          }
          p11.C_CloseSession(s);
          for (let i = 0; i < 3; i++) codes.push(await codeOf(recover(f.vault, 'tom', 'pw-tom-1')));
          // Fail closed or carry on: never anything but success or HSM_UNAVAILABLE.
          for (const c of codes) expect([ErrorCodes.HSM_UNAVAILABLE, 'NO_ERROR']).toContain(c);
          // And the vault must serve again by itself (the token is back: it never left).
          let ok = false;
          for (let i = 0; i < 20 && !ok; i++) {
            ok = (await codeOf(recover(f.vault, 'sue', 'pw-sue-1'))) === 'NO_ERROR';
            if (!ok) await new Promise((r) => setTimeout(r, 100));
          }
          expect(ok).toBe(true);
          expect(await f.vault.keys.ping()).toBe(true);
          expect((await recover(f.vault, 'tom', 'pw-tom-1')).outcome).toBe('ok');
          expect(f.vault.status('sue').attemptsLeft).toBe(10);
          // No attempt was lost to the fault beyond what completed (each finished recovery resets).
          const v = await f.restart();
          expect(v.status('tom')).toMatchObject({ state: 'active', attemptsLeft: 10 });
        } finally {
          await f.close();
        }
      }, 60_000);
    });
  }
});
