// The HSM worker pool (vault/hsm/pool/) against a real SoftHSM2
// token: the same answers as the direct path, OVERLOADED instead of unbounded
// queueing, and library recycles (C_Finalize/C_Initialize, which is what
// frees SoftHSM's destroyed session objects) that drop no request.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { p256 } from '@noble/curves/nist.js';
import pino from 'pino';
import { hsmOf, makeToken, type TestToken } from '../helpers/softhsm.js';
import { openKeys, openVault } from '../../vault/core/open.js';
import { poolKeys, poolOf, type HsmPool, type WorkerPoolOptions } from '../../vault/hsm/pool/pool.js';
import type { HsmKeys } from '../../vault/hsm/keys.js';
import type { HsmOp } from '../../vault/hsm/port.js';
import type { VaultKeys } from '../../vault/hsm/vault-keys.js';
import { VaultError, ErrorCodes, RETRYABLE } from '../../protocol/errors.js';
import { enroll, recover } from '../helpers/flows.js';
import { TEST_KDF } from '../helpers/vault.js';

const log = pino({ level: 'silent' });
let token: TestToken;
let direct: VaultKeys;

const hsm = () => hsmOf(token);
/** A valid P-256 point that is not the key's own. */
const point = () => p256.getPublicKey(p256.utils.randomSecretKey(), false);

beforeAll(() => {
  token = makeToken();
  // The key set, made on the direct path; it stays open to compare answers.
  direct = openKeys(hsm(), true, log);
});

const cleanups: (() => void)[] = [];

afterAll(() => {
  // Tokens are deleted only once nothing in this process has the library up (deleting
  // a token's files under an initialised SoftHSM makes its slot answer CKR_GENERAL_ERROR).
  direct.close();
  token.cleanup();
  for (const c of cleanups) c();
});

async function pool(o: WorkerPoolOptions = {}): Promise<HsmKeys<HsmPool>> {
  return poolKeys(hsm(), { log, ...o });
}

describe('the rules live once, above the port (vault/hsm/keys.ts), on both ports', () => {
  /** Records each operation the keys hand to their port. */
  function counted(k: HsmKeys): string[] {
    const ops: string[] = [];
    const port = k.port as { call: (op: HsmOp) => Promise<unknown> };
    const real = port.call.bind(port);
    port.call = (op: HsmOp) => {
      ops.push(op.op);
      return real(op);
    };
    return ops;
  }

  it('answers or refuses without an HSM call where a rule decides, and frames seals iv(12) ‖ ct ‖ tag(16)', async () => {
    const w = await pool({ threads: 1, recycleAfter: 0 });
    const d = openKeys(hsm(), false, log);
    try {
      for (const k of [w, d] as HsmKeys[]) {
        const ops = counted(k);
        const e = k.currentEpoch();
        // Too short to hold an IV and a tag: not authentic, and the HSM is not asked.
        expect(await k.unseal(e, new Uint8Array(1), new Uint8Array(27))).toBeNull();
        await expect(k.destroyEpoch(e)).rejects.toMatchObject({ code: ErrorCodes.BAD_REQUEST });
        await k.addEpoch(e);
        await k.adoptEpoch(e);
        await k.destroyEpoch(e + 1000);
        expect(ops).toEqual([]);
        const sealed = await k.seal(e, new Uint8Array(3), new Uint8Array(5));
        expect(sealed.length).toBe(12 + 5 + 16);
        expect(ops).toEqual(['encrypt']);
        // 28 bytes reach the HSM (and fail its tag check).
        expect(await k.unseal(e, new Uint8Array(3), sealed.subarray(0, 28))).toBeNull();
        expect(ops).toEqual(['encrypt', 'decrypt']);
        await expect(k.adoptEpoch(e + 1000)).rejects.toMatchObject({ code: ErrorCodes.HSM_POLICY_VIOLATION });
        expect(ops.at(-1)).toBe('findSeal');
      }
    } finally {
      await d.close();
      await w.close();
    }
  });
});

describe('worker pool answers like the direct path', () => {
  it('every VaultKeys call gives the same result on both paths', async () => {
    const w = await pool({ threads: 2, recycleAfter: 0 });
    try {
      expect(Buffer.from(w.channelPublic)).toEqual(Buffer.from(direct.channelPublic));
      expect(Buffer.from(w.signingPublic)).toEqual(Buffer.from(direct.signingPublic));
      expect(w.epochs()).toEqual(direct.epochs());
      for (let i = 0; i < 5; i++) {
        const b = point();
        expect(Buffer.from(await w.oprfEvaluate(b))).toEqual(Buffer.from(await direct.oprfEvaluate(b)));
        expect(Buffer.from(await w.channelAgree(b))).toEqual(Buffer.from(await direct.channelAgree(b)));
      }
      const input = randomBytes(80);
      const mac = await w.makeVerifier(input);
      expect(Buffer.from(mac)).toEqual(Buffer.from(await direct.makeVerifier(input)));
      expect(await w.checkVerifier(input, mac)).toBe(true);
      expect(await w.checkVerifier(input, new Uint8Array(32))).toBe(false);
      expect(Buffer.from(await w.tenantSecret(input))).toEqual(Buffer.from(await direct.tenantSecret(input)));
      // Sealed by one, opened by the other; a wrong AAD or a short blob is null on both.
      const e = w.currentEpoch();
      const pt = randomBytes(60);
      const aad = randomBytes(40);
      const sealedW = await w.seal(e, aad, pt);
      const sealedD = await direct.seal(e, aad, pt);
      expect(Buffer.from((await direct.unseal(e, aad, sealedW))!)).toEqual(pt);
      expect(Buffer.from((await w.unseal(e, aad, sealedD))!)).toEqual(pt);
      expect(await w.unseal(e, randomBytes(40), sealedW)).toBeNull();
      expect(await w.unseal(e, aad, sealedW.subarray(0, 20))).toBeNull();
      await expect(w.unseal(999, aad, sealedW)).rejects.toMatchObject({ code: ErrorCodes.RECORD_CORRUPT });
      const digest = randomBytes(32);
      const sig = await w.sign(digest);
      expect(p256.verify(sig, digest, w.signingPublic, { prehash: false, format: 'compact', lowS: false })).toBe(true);
      expect((await w.random(24)).length).toBe(24);
      // The anchor is one object on the token: written through the pool, read directly.
      const a = await w.readAnchor();
      expect(await direct.readAnchor()).toEqual(a);
      await w.writeAnchor({ seq: a.seq + 1, root: a.root });
      expect((await direct.readAnchor()).seq).toBe(a.seq + 1);
      // A real round trip (one job through the control lane), not a remembered flag.
      const jobs = w.port.stats().jobs;
      expect(await w.ping()).toBe(true);
      expect(w.port.stats().jobs).toBe(jobs + 1);
    } finally {
      await w.close();
    }
    // close() resolved only once every worker had ended.
    expect(w.port.stats()).toMatchObject({ threads: 0, control: false });
    expect(await w.ping()).toBe(false);
    await expect(w.oprfEvaluate(point())).rejects.toMatchObject({ code: ErrorCodes.HSM_UNAVAILABLE });
    // Closing the pool leaves the library up for the rest of the process.
    expect(await direct.ping()).toBe(true);
  });

  it('a vault on the pool enrols and recovers, across many recycles', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'bkv-pool-'));
    const own = makeToken();
    const vault = await openVault({
      hsm: { modulePath: own.modulePath, tokenLabel: own.label, pin: own.pin },
      dbPath: join(dir, 'vault.db'),
      createKeys: true,
      log,
      vault: { kdfFloor: TEST_KDF },
      hsmWorkers: { threads: 2, recycleAfter: 3 },
    });
    try {
      const key = new Uint8Array(randomBytes(32));
      await enroll(vault, 'pool-user', 'pw', key);
      for (let i = 0; i < 4; i++) {
        const r = await recover(vault, 'pool-user', 'pw');
        expect(r.outcome).toBe('ok');
        if (r.outcome === 'ok') expect(Buffer.from(r.key)).toEqual(Buffer.from(key));
      }
      expect((await recover(vault, 'pool-user', 'wrong')).outcome).toBe('wrong-password');
      expect(poolOf(vault.keys)!.stats().recycles).toBeGreaterThanOrEqual(2);
      // A token created since the library was initialised makes SoftHSM number its slots anew at
      // the next recycle. Every worker, not only the one that re-initialised, must find its token
      // by label again: concurrent recoveries put work on both.
      const other = makeToken();
      cleanups.push(() => other.cleanup());
      await poolOf(vault.keys)!.recycle();
      const users = Array.from({ length: 8 }, (_, i) => `pool-${i}`);
      for (const u of users) await enroll(vault, u, `pw-${u}`, new Uint8Array(randomBytes(32)));
      const outcomes = await Promise.all(users.map((u) => recover(vault, u, `pw-${u}`).then((r) => r.outcome)));
      expect(outcomes).toEqual(Array(8).fill('ok'));
    } finally {
      vault.close();
      vault.store.close();
      await vault.keys.close();
      rmSync(dir, { recursive: true, force: true });
      cleanups.push(() => own.cleanup());
    }
  });
});

describe('backpressure', () => {
  it('refuses ECDH work past the bounded queue with OVERLOADED (retryable), never the work in progress', async () => {
    const w = await pool({ threads: 1, maxQueue: 8, recycleAfter: 0 });
    try {
      const input = randomBytes(40);
      const mac = await w.makeVerifier(input);
      const b = point();
      const handshakes = Array.from({ length: 200 }, () => w.channelAgree(b).then(() => 'ok', (e: unknown) => e));
      // Completing a recovery (verifier check) is admitted even while handshakes are refused.
      const finishes = Array.from({ length: 20 }, () => w.checkVerifier(input, mac));
      const results = await Promise.all(handshakes);
      const refused = results.filter((r) => r !== 'ok') as VaultError[];
      expect(refused.length).toBeGreaterThan(100);
      expect(results.filter((r) => r === 'ok').length).toBeGreaterThanOrEqual(8);
      for (const e of refused) {
        expect(e).toBeInstanceOf(VaultError);
        expect(e.code).toBe(ErrorCodes.OVERLOADED);
      }
      expect(RETRYABLE.has(ErrorCodes.OVERLOADED)).toBe(true);
      expect(await Promise.all(finishes)).toEqual(Array(20).fill(true));
      expect(w.port.stats().overloaded).toBe(refused.length);
      // Once the queue drained, new work is admitted again.
      expect((await w.channelAgree(b)).length).toBe(32);
    } finally {
      await w.close();
    }
  });
});

describe('library recycle', () => {
  it('keeps serving: no request is dropped or answered wrongly across recycles', async () => {
    // Earlier recycles left `direct`'s handles stale (see vault/hsm/pool/pool.ts): resolve afresh.
    const b = point();
    const fresh = openKeys(hsm(), false, log);
    const want = Buffer.from(await fresh.oprfEvaluate(b));
    fresh.close();
    const w = await pool({ threads: 2, recycleAfter: 200, maxQueue: 100_000 });
    try {
      const input = randomBytes(40);
      const mac = await w.makeVerifier(input);
      // Waves of mixed calls, some submitted while a recycle is pending or running.
      const calls: Promise<boolean>[] = [];
      for (let wave = 0; wave < 10; wave++) {
        for (let i = 0; i < 150; i++) {
          calls.push(w.oprfEvaluate(b).then((x) => Buffer.from(x).equals(want)));
          if (i % 10 === 0) calls.push(w.checkVerifier(input, mac));
        }
        if (wave === 4) calls.push(w.port.recycle().then(() => true));
        await new Promise((r) => setTimeout(r, 5));
      }
      const results = await Promise.all(calls);
      expect(results.every((x) => x === true)).toBe(true);
      const s = w.port.stats();
      expect(s.recycles).toBeGreaterThanOrEqual(6);
      expect(s.derives).toBe(1500);
      expect(s.queued + s.inFlight).toBe(0);
      // The anchor object (a token object, re-resolved after each recycle) still reads and writes.
      const a = await w.readAnchor();
      await w.writeAnchor({ seq: a.seq + 1, root: a.root });
      expect((await w.readAnchor()).seq).toBe(a.seq + 1);
    } finally {
      await w.close();
    }
  });

});
