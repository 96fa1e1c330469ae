// The client SDK: enrol a backup key behind a password, recover it, change
// the password, query or delete the record. Runs in browsers and Node alike
// (WebCrypto, no `node:` imports); the network is the caller's Transport.
//
// Trust: the only thing the SDK trusts is `pinnedKey`. The descriptor (and
// with it the channel key) is accepted only if that key signed it, and every
// secret-bearing message travels in the end-to-end channel to that vault, so
// the transport/relay learns user ids, method names and sizes only.
import { p256 } from '@noble/curves/nist.js';
import { z } from 'zod';
import { VaultError, ErrorCodes, type ErrorCode } from '../protocol/errors.js';
import { verifyDescriptor, type Descriptor, type SignedDescriptor } from '../protocol/descriptor.js';
import { channelKeys, clientHandshake, openMessage, sealMessage, type ChannelKeys } from '../protocol/channel.js';
import { fromB64, toB64 } from '../protocol/bytes.js';
import { checkKdfParams, DEFAULT_KDF, type KdfParams } from '../protocol/kdf.js';
import { SIZES } from '../protocol/suite.js';
import { enrollPayload, finishOprf, openRecovered, startOprf, type PendingOprf } from './protocol.js';
import type { Transport } from './transport.js';
import { afterFailure, FAILOVER_CODES, NodeRing, outcomeUnknown, type Fate, type FailoverEvent, type FailoverOptions, type Step } from './failover.js';

export type { Transport } from './transport.js';
export type { Descriptor } from '../protocol/descriptor.js';
export { FAILOVER_CODES, REPEATABLE_WHEN_UNKNOWN, afterFailure } from './failover.js';
export type { FailoverEvent, FailoverOptions, Fate, Step } from './failover.js';

export interface VaultClientOptions {
  /** The vault: one node. Give this or `transports`. */
  transport?: Transport;
  /**
   * The nodes of one vault (a cohort: same keys, one pinned key), in order of
   * preference. The client fails over between them (docs/RPC.md#fail-over).
   */
  transports?: readonly Transport[];
  /** Node order, tries and backoff when there are several transports (or to restart flows on one). */
  failover?: FailoverOptions;
  /** The vault's signing key, 65-byte uncompressed SEC1 P-256, obtained out of band. */
  pinnedKey: Uint8Array;
  /** Argon2id for new enrolments; default DEFAULT_KDF, raised to the vault's floor. */
  kdf?: KdfParams;
  /** Retries of requests the vault marked `retryable` (rate limits, HSM hiccups). Default 2. */
  maxRetries?: number;
  /** Local clock (ms); injectable for tests. */
  now?: () => number;
  /**
   * The record namespace to act in (docs/RPC.md#namespaces). Omit for the tenant's own; another
   * one must be granted to the tenant by the vault's `tenants.grants`, else NAMESPACE_NOT_GRANTED.
   */
  namespace?: string;
}

export interface RecordStatus {
  userId: string;
  state: 'absent' | 'active' | 'locked' | 'deleted';
  attemptsLeft: number;
  attemptLimit: number;
}

export interface Enrolled {
  generation: number;
  attemptLimit: number;
}

// ---- wire shapes ---------------------------------------------------------------

const bytes = (len: number) =>
  z.string().transform((s, ctx) => {
    const b = fromB64(s);
    if (!b || b.length !== len) {
      ctx.addIssue({ code: 'custom', message: `must be ${len} bytes of base64url` });
      return z.NEVER;
    }
    return b;
  });
const int = z.number().int().min(0);
const kdfShape = z.object({ alg: z.literal('argon2id'), m: int, t: int, p: int });

const DescriptorWire = z.object({
  descriptor: z.object({
    version: int,
    vaultId: bytes(16),
    channelKey: bytes(SIZES.point),
    epoch: int,
    attemptLimit: int,
    kdfFloor: kdfShape,
    signature: bytes(64),
  }),
  now: z.number().int(),
});

const ChannelReply = z.object({ channel: z.object({ n: int, ct: z.string() }) });

const Inner = z.union([
  z.object({ ok: z.literal(true), result: z.unknown() }),
  z.object({
    ok: z.literal(false),
    error: z.object({ code: z.string(), message: z.string(), detail: z.unknown().optional() }),
  }),
]);

const Replies = {
  'enroll.begin': z.object({ evaluated: bytes(SIZES.x), attemptLimit: int, kdfFloor: kdfShape }),
  'enroll.finish': z.object({ generation: int, attemptLimit: int }),
  'recover.begin': z.object({ evaluated: bytes(SIZES.x), kdf: kdfShape, attemptsLeft: int, attemptLimit: int }),
  'recover.finish': z.discriminatedUnion('outcome', [
    z.object({ outcome: z.literal('ok'), envelope: bytes(SIZES.envelope), grant: z.string().max(64) }),
    z.object({ outcome: z.literal('wrong-password'), attemptsLeft: int }),
    z.object({ outcome: z.literal('locked') }),
  ]),
} as const;
export type ChannelMethod = keyof typeof Replies;

const StatusWire = z.object({
  userId: z.string(),
  state: z.enum(['absent', 'active', 'locked', 'deleted']),
  attemptsLeft: int,
  attemptLimit: int,
});

/** A reply that does not have the documented shape: the vault (or relay) is broken, not the caller. */
function shape<T extends z.ZodType>(schema: T, v: unknown, what: string): z.output<T> {
  const r = schema.safeParse(v);
  if (!r.success) throw new VaultError(ErrorCodes.INTERNAL, `malformed ${what} from the vault`);
  return r.data;
}

const KNOWN = new Set<string>(Object.values(ErrorCodes));
const asCode = (c: string): ErrorCode => (KNOWN.has(c) ? (c as ErrorCode) : ErrorCodes.INTERNAL);

function flatDetail(d: unknown): Record<string, string | number | boolean> | undefined {
  if (!d || typeof d !== 'object') return undefined;
  const out: Record<string, string | number | boolean> = {};
  for (const [k, v] of Object.entries(d)) if (['string', 'number', 'boolean'].includes(typeof v)) out[k] = v as string | number | boolean;
  return Object.keys(out).length ? out : undefined;
}

/** Decode `vault.descriptor`'s result (not yet verified: pass it to verifyDescriptor). */
export function decodeDescriptor(result: unknown): { descriptor: SignedDescriptor; now: number } {
  const r = shape(DescriptorWire, result, 'descriptor');
  return { descriptor: { ...r.descriptor, kdfFloor: { ...r.descriptor.kdfFloor, alg: 'argon2id' } }, now: r.now };
}

/** The strongest of each Argon2id parameter: an enrolment never goes below any floor it was told. */
export function raiseKdf(wanted: KdfParams, ...floors: KdfParams[]): KdfParams {
  let k = { ...wanted };
  for (const f of floors) k = { alg: 'argon2id', m: Math.max(k.m, f.m), t: Math.max(k.t, f.t), p: Math.max(k.p, f.p) };
  return k;
}

/** Record KDF parameters are checked against hard ceilings only, so a record cannot make us allocate unbounded memory. */
const ANY_FLOOR: KdfParams = { alg: 'argon2id', m: 8, t: 1, p: 1 };

// ---- the end-to-end channel ----------------------------------------------------

/**
 * One client session with the vault (channel.ts has the key schedule). The
 * counter `n` is spent only when the vault answers in the channel; an outer
 * JSON-RPC error means the vault changed nothing, so the same message may be
 * sent again. Exported for tests; apps use VaultClient.
 */
export class Channel {
  readonly id: Uint8Array;
  private readonly ephemeral: Uint8Array;
  private readonly keys: ChannelKeys;
  private n = 0;
  private broken = false;

  /** `e` (the ephemeral secret) is fixed only by tests. */
  constructor(
    d: Descriptor,
    readonly userId: string,
    private readonly clock: () => number,
    e?: Uint8Array,
  ) {
    const hs = clientHandshake(d.channelKey, e);
    this.ephemeral = hs.ephemeral;
    this.keys = channelKeys(hs.z, hs.ephemeral, d.vaultId, d.channelKey);
    hs.z.fill(0);
    this.id = this.keys.id;
  }

  get counter(): number {
    return this.n;
  }

  /** The JSON-RPC params for message `n`: `epk` only on the first, `ts` from the vault-adjusted clock. */
  async seal(method: ChannelMethod, body: unknown): Promise<{ userId: string; channel: Record<string, unknown> }> {
    if (this.broken) throw new VaultError(ErrorCodes.BAD_REQUEST, 'this channel failed earlier; start a new one');
    const ts = Math.max(0, Math.round(this.clock()));
    const ct = await sealMessage(this.keys.c2s, { dir: 'c2s', channelId: this.id, counter: this.n, method, userId: this.userId, ts }, body);
    return {
      userId: this.userId,
      channel: { id: toB64(this.id), ...(this.n === 0 ? { epk: toB64(this.ephemeral) } : {}), n: this.n, ts, ct: toB64(ct) },
    };
  }

  /**
   * Open the vault's answer to message `n` and advance the counter. Inner
   * refusals ({ok:false}) become VaultErrors with the vault's code.
   */
  async open(method: ChannelMethod, reply: unknown): Promise<unknown> {
    const r = ChannelReply.safeParse(reply);
    const ct = r.success ? fromB64(r.data.channel.ct) : undefined;
    if (!r.success || !ct || r.data.channel.n !== this.n) {
      this.broken = true; // the counter's state is unknown now
      throw new VaultError(ErrorCodes.OUT_OF_ORDER, 'vault reply does not answer this channel message');
    }
    const h = { dir: 's2c' as const, channelId: this.id, counter: this.n, method, userId: this.userId, ts: 0 };
    let body: unknown;
    try {
      body = await openMessage(this.keys.s2c, h, ct);
    } catch (e) {
      this.broken = true;
      throw e;
    }
    this.n++;
    const inner = shape(Inner, body, `${method} reply`);
    if (!inner.ok) throw new VaultError(asCode(inner.error.code), inner.error.message, flatDetail(inner.error.detail));
    return inner.result;
  }
}

// ---- the client ------------------------------------------------------------------

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * A step that failed, with what became of it (failover.ts: Fate). Internal:
 * the operation loop unwraps it, the caller only ever sees the VaultError.
 */
class StepFailure extends Error {
  constructor(
    readonly step: Step,
    readonly error: VaultError,
    readonly fate: Fate,
  ) {
    super(error.message);
  }
}

/** 16 random bytes, base64url: one password guess, the same on every node it is sent to. */
function newGuessId(): string {
  return toB64(globalThis.crypto.getRandomValues(new Uint8Array(16)));
}

export class VaultClient {
  private readonly nodes: readonly Transport[];
  private readonly ring: NodeRing;
  private readonly onFailover: ((e: FailoverEvent) => void) | undefined;
  private readonly pinnedKey: Uint8Array;
  private readonly kdf: KdfParams;
  private readonly maxRetries: number;
  private readonly localNow: () => number;
  private cached: Descriptor | undefined;
  /** vault clock − local clock, from the last descriptor fetch. */
  private offsetMs = 0;
  /** `namespace` for every request's params, when one was chosen. */
  private readonly scope: { namespace?: string };

  constructor(o: VaultClientOptions) {
    if (!(o.pinnedKey instanceof Uint8Array) || o.pinnedKey.length !== SIZES.point || o.pinnedKey[0] !== 0x04) {
      throw new VaultError(ErrorCodes.BAD_REQUEST, 'pinnedKey must be a 65-byte uncompressed P-256 public key');
    }
    try {
      p256.Point.fromBytes(o.pinnedKey).assertValidity();
    } catch {
      throw new VaultError(ErrorCodes.INVALID_POINT, 'pinnedKey is not a valid P-256 point');
    }
    if ((o.transport === undefined) === (o.transports === undefined)) {
      throw new VaultError(ErrorCodes.BAD_REQUEST, 'give either transport (one vault node) or transports (the nodes of one vault)');
    }
    this.nodes = o.transport ? [o.transport] : [...o.transports!];
    this.ring = new NodeRing(this.nodes.length, o.failover);
    this.onFailover = o.failover?.onFailover;
    this.pinnedKey = new Uint8Array(o.pinnedKey);
    // Validate the app's own choice once, against the protocol minimum; the vault floor is applied per enrolment.
    this.kdf = o.kdf ? checkKdfParams(o.kdf, ANY_FLOOR) : DEFAULT_KDF;
    this.maxRetries = o.maxRetries ?? 2;
    this.localNow = o.now ?? Date.now;
    this.scope = o.namespace === undefined ? {} : { namespace: o.namespace };
  }

  /** Close every transport (calls in flight fail). The client may be used again: transports reconnect. */
  close(): void {
    for (const t of this.nodes) t.close();
  }

  /** The vault's clock as best we know it: `ts` must be within ±60 s of it. */
  private vaultNow = (): number => this.localNow() + this.offsetMs;

  /** Fetch, verify against the pinned key and cache the descriptor; `refresh` forces a new fetch. */
  async descriptor(opts: { refresh?: boolean } = {}): Promise<Descriptor> {
    if (this.cached && !opts.refresh) return this.cached;
    return this.operation((t) => this.fetchDescriptor(t));
  }

  private async fetchDescriptor(t: Transport): Promise<Descriptor> {
    const t0 = this.localNow();
    const raw = await this.call(t, 'vault.descriptor', {});
    const t1 = this.localNow();
    const { descriptor, now } = decodeDescriptor(raw);
    // Every node of a cohort holds the same keys, so every node's descriptor verifies against the one pinned key.
    const d = verifyDescriptor(descriptor, this.pinnedKey);
    // The vault read its clock somewhere inside our round trip; the midpoint halves the error.
    this.offsetMs = now - (t0 + t1) / 2;
    this.cached = d;
    return d;
  }

  async enrollPassword(userId: string, password: string, backupKey: Uint8Array): Promise<Enrolled> {
    checkBackupKey(backupKey);
    const d = await this.descriptor();
    // Each try on a new channel: a channel belongs to the node that did its handshake.
    return this.operation((t) => this.enrollOn(t, new Channel(d, userId, this.vaultNow), d, password, backupKey));
  }

  /** The escrowed backup key, or WRONG_PASSWORD (detail.attemptsLeft) / LOCKED / RECORD_NOT_FOUND. */
  async recoverWithPassword(userId: string, password: string): Promise<Uint8Array> {
    const d = await this.descriptor();
    // One guess, however many nodes it takes: the same guess id and blinded element on each try.
    const guess = { id: newGuessId(), oprf: startOprf(d.vaultId, userId, password) };
    return (await this.operation((t) => this.recoverOn(t, new Channel(d, userId, this.vaultNow), d, guess))).key;
  }

  /**
   * Prove the old password, then re-enrol under the new one. The successful
   * recovery yields a short-lived grant (inside the channel, never visible to
   * the relay) that the vault requires to replace an active record; it is
   * presented on a second channel, to the node that issued it. Re-escrows the
   * same key unless `backupKey` is given. If that node fails before the
   * enrolment is sent, both steps run again on another node (a right password
   * costs no attempt; a new recovery is a new guess).
   */
  async changePassword(userId: string, oldPassword: string, newPassword: string, backupKey?: Uint8Array): Promise<Enrolled> {
    if (backupKey) checkBackupKey(backupKey);
    const d = await this.descriptor();
    let guess = { id: newGuessId(), oprf: startOprf(d.vaultId, userId, oldPassword) };
    return this.operation(async (t) => {
      const { key: current, grant } = await this.recoverOn(t, new Channel(d, userId, this.vaultNow), d, guess);
      // That guess is decided (right); should this try fail, the next recovery is another guess.
      guess = { id: newGuessId(), oprf: startOprf(d.vaultId, userId, oldPassword) };
      try {
        return await this.enrollOn(t, new Channel(d, userId, this.vaultNow), d, newPassword, backupKey ?? current, grant);
      } finally {
        current.fill(0);
      }
    });
  }

  async status(userId: string): Promise<RecordStatus> {
    return this.operation(async (t) => shape(StatusWire, await this.call(t, 'record.status', { userId, ...this.scope }), 'record.status reply'));
  }

  async delete(userId: string): Promise<void> {
    await this.operation((t) => this.call(t, 'record.delete', { userId, ...this.scope }));
  }

  // ---- fail-over ----

  /**
   * Run `attempt` on the current node; when a step of it fails in a way
   * another node may not (failover.ts: afterFailure), start it again on the
   * next node, at most `maxAttempts` tries in all, with jittered backoff.
   */
  private async operation<T>(attempt: (t: Transport) => Promise<T>): Promise<T> {
    for (let tries = 1; ; tries++) {
      const node = this.ring.node;
      try {
        return await attempt(this.nodes[node]!);
      } catch (e) {
        if (!(e instanceof StepFailure)) throw e;
        const next = afterFailure(e.step, e.error.code, e.fate);
        if (next === 'unknown') throw outcomeUnknown(e.step, e.error);
        if (next === 'surface') throw e.error;
        const to = this.ring.advance(node);
        if (tries >= this.ring.maxAttempts) {
          if (tries === 1) throw e.error;
          const where = this.nodes.length === 1 ? '' : ` on ${this.nodes.length} vault nodes`;
          throw new VaultError(e.error.code, `${e.error.message} (gave up after ${tries} tries${where})`, { ...e.error.detail, tries });
        }
        try {
          this.onFailover?.({ from: node, to, step: e.step, code: e.error.code, attempt: tries });
        } catch {
          // an observer's failure is not the vault's
        }
        await sleep(this.ring.delayMs(tries, e.error, to === node));
      }
    }
  }

  // ---- flows on one channel ----

  private async enrollOn(t: Transport, ch: Channel, d: Descriptor, password: string, backupKey: Uint8Array, grant?: string): Promise<Enrolled> {
    const p = startOprf(d.vaultId, ch.userId, password);
    const body = { blinded: toB64(p.blinded), ...(grant ? { grant } : {}) };
    const begun = shape(Replies['enroll.begin'], await this.send(t, ch, 'enroll.begin', body), 'enroll.begin reply');
    // The signed floor and the channel's floor can only raise what we use, never lower it.
    const kdf = raiseKdf(this.kdf, d.kdfFloor, checkKdfParams(begun.kdfFloor, ANY_FLOOR));
    const payload = await enrollPayload(p, begun.evaluated, kdf, backupKey);
    try {
      const done = await this.send(t, ch, 'enroll.finish', {
        authKey: toB64(payload.authKey),
        envelope: toB64(payload.envelope),
        kdf: payload.kdf,
      });
      return shape(Replies['enroll.finish'], done, 'enroll.finish reply');
    } finally {
      payload.authKey.fill(0);
    }
  }

  private async recoverOn(t: Transport, ch: Channel, d: Descriptor, guess: { id: string; oprf: PendingOprf }): Promise<{ key: Uint8Array; grant: string }> {
    const p = guess.oprf;
    // `guess` makes a repeated begin idempotent in a cohort: a guess id already counted is not counted again.
    const body = { blinded: toB64(p.blinded), guess: guess.id };
    const begun = shape(Replies['recover.begin'], await this.send(t, ch, 'recover.begin', body), 'recover.begin reply');
    const keys = await finishOprf(p, begun.evaluated, checkKdfParams(begun.kdf, ANY_FLOOR));
    try {
      const r = shape(Replies['recover.finish'], await this.send(t, ch, 'recover.finish', { authKey: toB64(keys.authKey) }), 'recover.finish reply');
      if (r.outcome === 'wrong-password') {
        const n = r.attemptsLeft;
        throw new VaultError(ErrorCodes.WRONG_PASSWORD, `wrong password: ${n} attempt${n === 1 ? '' : 's'} left`, { attemptsLeft: n });
      }
      if (r.outcome === 'locked') {
        throw new VaultError(ErrorCodes.LOCKED, 'record is locked: the attempt limit was reached and the key destroyed');
      }
      return { key: await openRecovered(p, keys, r.envelope), grant: r.grant };
    } finally {
      keys.authKey.fill(0);
      keys.envKey.fill(0);
    }
  }

  /**
   * One channel message. Outer errors left the channel untouched, so a
   * retryable one is resent as is, and a stale handshake is resealed once
   * with the clock the vault reported. A refusal inside the channel is a step
   * the vault ran (`answered`).
   */
  private async send(t: Transport, ch: Channel, method: ChannelMethod, body: unknown): Promise<unknown> {
    let params = { ...(await ch.seal(method, body)), ...this.scope };
    let resynced = false;
    for (;;) {
      let reply: unknown;
      try {
        reply = await this.call(t, method, params);
      } catch (e) {
        const err = e instanceof StepFailure ? e.error : e;
        if (err instanceof VaultError && err.code === ErrorCodes.STALE_MESSAGE && ch.counter === 0 && !resynced) {
          resynced = true;
          const now = err.detail?.now;
          if (typeof now === 'number') this.offsetMs = now - this.localNow();
          else await this.fetchDescriptor(t).catch(() => undefined);
          params = { ...(await ch.seal(method, body)), ...this.scope };
          continue;
        }
        throw e;
      }
      try {
        return await ch.open(method, reply);
      } catch (e) {
        throw e instanceof VaultError ? new StepFailure(method, e, 'answered') : e;
      }
    }
  }

  /**
   * transport.call with bounded retries, on the same node, of what the vault
   * guarantees changed nothing; errors that another node may not have are
   * left to the operation loop when there is another node (or try) to go to.
   */
  private async call(t: Transport, method: Step, params: object): Promise<unknown> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await t.call(method, params);
      } catch (e) {
        if (!(e instanceof VaultError)) throw e;
        // VAULT_UNREACHABLE is the transport's own: sent or not decides. Any other code is the vault's outer answer.
        const fate: Fate = e.code !== ErrorCodes.VAULT_UNREACHABLE || e.detail?.sent === false ? 'refused' : 'unknown';
        const moveOn = this.ring.maxAttempts > 1 && FAILOVER_CODES.has(e.code);
        if (moveOn || e.detail?.retryable !== true || attempt >= this.maxRetries) throw new StepFailure(method, e, fate);
        const after = e.detail.retryAfterMs;
        await sleep(Math.min(typeof after === 'number' && after > 0 ? after : 200 * 2 ** attempt, 5_000));
      }
    }
  }
}

function checkBackupKey(k: Uint8Array): void {
  if (!(k instanceof Uint8Array) || k.length !== SIZES.key) {
    throw new VaultError(ErrorCodes.BAD_REQUEST, `backup key must be ${SIZES.key} bytes`);
  }
}
