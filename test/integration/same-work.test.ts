// docs/THREAT-MODEL.md claims a recover.finish takes the same time whether the password
// was right or wrong. The core's part of that claim, checked exactly rather than by the
// clock (the clock comparisons are test/soak/timing.test.ts, ./scripts/timing).
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { randomBytes } from 'node:crypto';
import { tempVault, type TestVault } from '../helpers/vault.js';
import { CALLER, enroll, beginOnly } from '../helpers/flows.js';

// The core's part of the claim, checked exactly rather than by the clock: a right and a
// wrong password make the same HSM calls in the same order and write the record and the
// anchor alike. The keys are the real SoftHSM-backed ones, wrapped only to record calls.
describe('recover.finish: right vs wrong password, in the core', () => {
  let t: TestVault;
  const calls: string[] = [];
  beforeAll(async () => {
    t = await tempVault();
    const keys = t.vault.keys as unknown as Record<string, unknown>;
    for (const m of ['oprfEvaluate', 'makeVerifier', 'checkVerifier', 'seal', 'unseal', 'sign', 'random', 'readAnchor', 'writeAnchor']) {
      const real = keys[m] as (...a: unknown[]) => unknown;
      keys[m] = (...a: unknown[]) => {
        calls.push(m);
        return real.apply(t.vault.keys, a);
      };
    }
  });
  afterAll(() => t.close());

  async function finishTraced(userId: string, password: string) {
    const b = await beginOnly(t.vault, userId, password);
    const before = t.vault.store.records.get(userId)!;
    t.clock.now += 1000;
    calls.length = 0;
    const r = await t.vault.recoverFinish(CALLER, b.sessionId, b.authKey);
    const after = t.vault.store.records.get(userId)!;
    return { outcome: r.outcome, calls: [...calls], rewritten: after.updatedAt > before.updatedAt };
  }

  it('makes the same HSM calls and writes the record and the anchor either way', async () => {
    await enroll(t.vault, 'same-work', 'pw-same-work', new Uint8Array(randomBytes(32)));
    const wrong = await finishTraced('same-work', 'wrong password');
    const right = await finishTraced('same-work', 'pw-same-work');
    expect(wrong.outcome).toBe('wrong-password');
    expect(right.outcome).toBe('ok');
    expect(right.calls).toContain('checkVerifier');
    expect(right.calls).toContain('unseal');
    expect(right.calls).toContain('writeAnchor');
    expect(wrong.calls).toEqual(right.calls);
    expect([wrong.rewritten, right.rewritten]).toEqual([true, true]);
  });
});

