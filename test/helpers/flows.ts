// The client side of enrol and recover, driven straight against the core.
import type { CallerContext, Vault } from '../../vault/core/vault.js';
import { enrollPayload, finishOprf, openRecovered, startOprf } from '../../client/protocol.js';
import { TEST_KDF } from './vault.js';

/** The caller the core sees in these flows (the RPC layer passes the authenticated tenant). */
export const CALLER: CallerContext = { tenant: 'test' };

/** Every secret a test used, so leak scans can look for all of them. */
export const secretsSeen: Uint8Array[] = [];

export async function enroll(v: Vault, userId: string, password: string, key: Uint8Array, grant?: string, ctx: CallerContext = CALLER) {
  const p = startOprf(v.vaultId, userId, password);
  const b = await v.enrollBegin(ctx, userId, p.blinded, grant ? { grant } : {});
  const payload = await enrollPayload(p, b.evaluated, TEST_KDF, key);
  secretsSeen.push(key, payload.authKey);
  return v.enrollFinish(ctx, b.sessionId, userId, grant ? { ...payload, grant } : payload);
}

export type Recovered =
  | { outcome: 'ok'; key: Uint8Array; grant: string }
  | { outcome: 'wrong-password'; attemptsLeft: number }
  | { outcome: 'locked' };

export async function recover(v: Vault, userId: string, password: string, ctx: CallerContext = CALLER): Promise<Recovered> {
  const p = startOprf(v.vaultId, userId, password);
  const b = await v.recoverBegin(ctx, userId, p.blinded);
  const keys = await finishOprf(p, b.evaluated, b.kdf);
  secretsSeen.push(keys.authKey, keys.envKey);
  const r = await v.recoverFinish(ctx, b.sessionId, keys.authKey);
  if (r.outcome === 'ok') return { outcome: 'ok', key: await openRecovered(p, keys, r.envelope), grant: r.grant };
  if (r.outcome === 'wrong-password') return { outcome: 'wrong-password', attemptsLeft: r.attemptsLeft };
  return { outcome: 'locked' };
}

/** Begin a recovery and return what a client would need to finish it later (or never). */
export async function beginOnly(v: Vault, userId: string, password: string, ctx: CallerContext = CALLER) {
  const p = startOprf(v.vaultId, userId, password);
  const b = await v.recoverBegin(ctx, userId, p.blinded);
  const keys = await finishOprf(p, b.evaluated, b.kdf);
  return { sessionId: b.sessionId, authKey: keys.authKey, attemptsLeft: b.attemptsLeft, p, keys };
}
