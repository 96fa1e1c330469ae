// The benchmark's client side of the vault protocol, kept lean so one load
// generator process can drive the vault hard on the same machine:
//
// - the channel is the real one (docs/PROTOCOL.md#channel: ECDH with the
//   vault's channel key, HKDF, AES-256-GCM with counter nonces and the
//   protocol's AAD and padding) but computed with node:crypto;
// - the client's password work (hash-to-curve, blinding, Argon2id) runs on the
//   user's device, not on the vault host, so synthetic users skip it: each
//   sends a fixed valid P-256 point as `blinded` and a per-user authKey and
//   envelope derived from a seed. The vault cannot tell and does exactly the
//   work it does for a real client (point check, OPRF ECDH, HMAC verifier,
//   seal/unseal, counters, anchor). Every recovery checks the returned
//   envelope byte for byte.
import { createCipheriv, createDecipheriv, createECDH, createHash, createHmac, hkdfSync } from 'node:crypto';
import { CHANNEL_DST, channelIdOf, messageAad, messageNonce, pad, unpad, type MessageHeader } from '../../protocol/channel.js';
import { frame, toB64, fromB64 } from '../../protocol/bytes.js';
import { SIZES } from '../../protocol/suite.js';
import type { Rpc } from './rpc.js';
import { RpcError } from './rpc.js';

export interface VaultInfo {
  vaultId: Uint8Array;
  channelKey: Uint8Array;
  kdfFloor: { alg: 'argon2id'; m: number; t: number; p: number };
}

export interface SyntheticUser {
  userId: string;
  authKey: string;
  envelope: Uint8Array;
  envelopeB64: string;
}

const SEED = 'bkv-bench-v1';

export function syntheticUser(i: number): SyntheticUser {
  const h = (label: string, n: number) => createHmac('sha256', SEED).update(`${label}:${i}`).digest().subarray(0, n);
  const envelope = new Uint8Array(Buffer.concat([h('env-a', 32), h('env-b', SIZES.envelope - 32)]));
  return { userId: `u${i}`, authKey: toB64(h('auth', SIZES.authKey)), envelope, envelopeB64: toB64(envelope) };
}

/** Any valid P-256 point will do as the blinded element: the generator's double. */
const ecdhFixed = createECDH('prime256v1');
ecdhFixed.setPrivateKey(Buffer.alloc(32, 0).fill(2, 31));
export const BLINDED = toB64(new Uint8Array(ecdhFixed.getPublicKey()));

export async function fetchVault(rpc: Rpc): Promise<VaultInfo> {
  const r = (await rpc.call('vault.descriptor', {})) as { descriptor: { vaultId: string; channelKey: string; kdfFloor: VaultInfo['kdfFloor'] } };
  return { vaultId: fromB64(r.descriptor.vaultId)!, channelKey: fromB64(r.descriptor.channelKey)!, kdfFloor: r.descriptor.kdfFloor };
}

export class InnerError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

/** One client channel (one ephemeral key), node:crypto throughout. */
export class LeanChannel {
  private readonly id: Uint8Array;
  private readonly epk: Uint8Array;
  private readonly c2s: Buffer;
  private readonly s2c: Buffer;
  private n = 0;

  constructor(
    v: VaultInfo,
    private readonly userId: string,
    salt: Buffer,
  ) {
    const e = createECDH('prime256v1');
    e.generateKeys();
    this.epk = new Uint8Array(e.getPublicKey());
    const z = e.computeSecret(Buffer.from(v.channelKey));
    this.id = channelIdOf(this.epk);
    this.c2s = Buffer.from(hkdfSync('sha256', z, salt, Buffer.from(frame(CHANNEL_DST.c2s, this.epk)), 32));
    this.s2c = Buffer.from(hkdfSync('sha256', z, salt, Buffer.from(frame(CHANNEL_DST.s2c, this.epk)), 32));
  }

  static salt(v: VaultInfo): Buffer {
    return createHash('sha256').update(frame(CHANNEL_DST.salt, v.vaultId, v.channelKey)).digest();
  }

  async send(rpc: Rpc, method: string, body: unknown): Promise<unknown> {
    const ts = Date.now();
    const h: MessageHeader = { dir: 'c2s', channelId: this.id, counter: this.n, method, userId: this.userId, ts };
    const c = createCipheriv('aes-256-gcm', this.c2s, messageNonce(this.n));
    c.setAAD(messageAad(h));
    const ct = Buffer.concat([c.update(pad(body)), c.final(), c.getAuthTag()]);
    const params = {
      userId: this.userId,
      channel: { id: toB64(this.id), ...(this.n === 0 ? { epk: toB64(this.epk) } : {}), n: this.n, ts, ct: toB64(ct) },
    };
    const reply = (await rpc.call(method, params)) as { channel: { n: number; ct: string } };
    const rct = Buffer.from(fromB64(reply.channel.ct)!);
    const d = createDecipheriv('aes-256-gcm', this.s2c, messageNonce(this.n));
    d.setAAD(messageAad({ ...h, dir: 's2c', ts: 0 }));
    d.setAuthTag(rct.subarray(rct.length - 16));
    const pt = Buffer.concat([d.update(rct.subarray(0, rct.length - 16)), d.final()]);
    this.n++;
    const inner = unpad(new Uint8Array(pt)) as { ok: boolean; result?: unknown; error?: { code: string; message: string } };
    if (!inner.ok) throw new InnerError(inner.error!.code, inner.error!.message);
    return inner.result;
  }
}

export interface FlowContext {
  vault: VaultInfo;
  salt: Buffer;
  kdf: { alg: 'argon2id'; m: number; t: number; p: number };
  /** x(k·BLINDED), learned from the first evaluation; every later one must match. */
  evaluated?: string;
}

export async function enrollOnce(rpc: Rpc, ctx: FlowContext, u: SyntheticUser): Promise<void> {
  const ch = new LeanChannel(ctx.vault, u.userId, ctx.salt);
  const b = (await ch.send(rpc, 'enroll.begin', { blinded: BLINDED })) as { evaluated: string };
  checkEvaluated(ctx, b.evaluated);
  await ch.send(rpc, 'enroll.finish', { authKey: u.authKey, envelope: u.envelopeB64, kdf: ctx.kdf });
}

export async function recoverOnce(rpc: Rpc, ctx: FlowContext, u: SyntheticUser): Promise<void> {
  const ch = new LeanChannel(ctx.vault, u.userId, ctx.salt);
  const b = (await ch.send(rpc, 'recover.begin', { blinded: BLINDED })) as { evaluated: string };
  checkEvaluated(ctx, b.evaluated);
  const f = (await ch.send(rpc, 'recover.finish', { authKey: u.authKey })) as { outcome: string; envelope?: string };
  if (f.outcome !== 'ok' || f.envelope !== u.envelopeB64) throw new InnerError('WRONG_RESULT', `recovery of ${u.userId} returned ${f.outcome}`);
}

function checkEvaluated(ctx: FlowContext, x: string): void {
  ctx.evaluated ??= x;
  if (x !== ctx.evaluated) throw new InnerError('WRONG_RESULT', 'the OPRF evaluation changed');
}

export function codeOf(e: unknown): string {
  if (e instanceof RpcError || e instanceof InnerError) return e.code;
  return (e as { code?: string })?.code ?? (e as Error)?.message ?? 'ERROR';
}
