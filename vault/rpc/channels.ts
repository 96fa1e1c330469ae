// The vault end of the client channels: handshake through the HSM, strict
// counters, and the per-channel step machine that decides which method may
// come next. Everything the relay can see or tamper with is checked here;
// the decrypted bodies go to the core.
import { VaultError, ErrorCodes, isVaultError } from '../../protocol/errors.js';
import type { CallerContext, Vault } from '../core/vault.js';
import { channelIdOf, channelKeys, type ChannelKeys } from '../../protocol/channel.js';
// Same AEAD as channel.ts, on node:crypto (docs/PERFORMANCE.md).
import { openMessage, sealMessage } from './channel-node.js';
import { validatePoint } from '../../protocol/oprf.js';
import { equalBytes, toB64 } from '../../protocol/bytes.js';
import { Bodies, parse } from './wire.js';
import { LEGACY_NAMESPACE } from '../core/namespace.js';
import type { z } from 'zod';
import type { ChannelParams } from './wire.js';

export type ChannelMethod = keyof typeof Bodies;
type Step = 'new' | 'enroll-begun' | 'recover-begun' | 'done';

/**
 * Which method each step accepts. A channel carries one enrolment or one
 * recovery and closes after its finish whatever the outcome, so the relay
 * cannot tell a right password from a wrong one by what the channel does next.
 */
const NEXT: Record<Step, Partial<Record<ChannelMethod, true>>> = {
  new: { 'enroll.begin': true, 'recover.begin': true },
  'enroll-begun': { 'enroll.finish': true },
  'recover-begun': { 'recover.finish': true },
  done: {},
};

interface Channel {
  keys: ChannelKeys;
  /** The tenant that opened it: its quota holds the channel's slot. */
  owner: string;
  /** Opened with enroll.begin: counts against the tenant's enrolment quota too. */
  enroll: boolean;
  /** The record namespace it acts in, resolved for `owner` when it opened; fixed for its life. */
  namespace: string;
  userId: string;
  next: number;
  step: Step;
  busy: boolean;
  expiresAt: number;
  /** The handshake's timestamp: its id is remembered until that handshake could no longer be fresh. */
  ts: number;
  coreSession?: string;
  /** Proof of the current password, from enroll.begin, for a password change. */
  grant?: string;
}

export interface ChannelOptions {
  ttlMs: number;
  /** Allowed age of a handshake's ts. */
  freshnessMs: number;
  /** Allowed lead of a handshake's ts over the vault clock (client clock skew). */
  aheadMs?: number;
  /** Open channels in all (the memory bound): past it, OVERLOADED. */
  maxChannels: number;
  /** Open channels per tenant: past it, RATE_LIMITED. */
  tenantChannels: number;
  /** Open channels per tenant that began with enroll.begin (limits.tenantEnrollments). */
  tenantEnrollChannels: number;
  /** Closed channel ids remembered per tenant (replay protection): past it, RATE_LIMITED until some age out. */
  tenantClosedChannels: number;
  now: () => number;
  /** Called with unexpected (non-VaultError) failures, which the client sees only as INTERNAL. */
  onInternalError?: (e: unknown) => void;
}

type Body = { ok: true; result: unknown } | { ok: false; error: { code: string; message: string; detail?: unknown } };

/** What one tenant holds (issue 14: one tenant's flood must not take another's room). */
interface TenantChannels {
  /** Handshakes admitted and not yet closed: live channels and those still in their HSM call. */
  open: number;
  enroll: number;
  spent: number;
  /** Its live channels in opening order (= expiry order), all and begun with enroll.begin, for retryAfterMs. */
  live: Set<Channel>;
  liveEnroll: Set<Channel>;
}

export interface ChannelStats {
  live: number;
  spent: number;
  tenants: number;
}

export class ChannelTable {
  /** Live channels in opening order, which is expiry order (one TTL for all). */
  private readonly live = new Map<string, Channel>();
  /**
   * Ids of closed channels, until their handshake could no longer pass the freshness
   * check, with the tenant whose quota they count against. Never evicted early (that
   * would reopen replays): a tenant at its bound is refused new handshakes instead.
   */
  private readonly spent = new Map<string, { until: number; owner: string }>();
  private readonly tenants = new Map<string, TenantChannels>();
  /** Handshakes admitted (live or in their HSM call), for the global bound. */
  private admitted = 0;
  private readonly startedAt: number;

  constructor(
    private readonly vault: Vault,
    private readonly o: ChannelOptions,
  ) {
    this.startedAt = o.now();
  }

  get size(): number {
    return this.live.size;
  }

  stats(): ChannelStats {
    return { live: this.live.size, spent: this.spent.size, tenants: this.tenants.size };
  }

  /** What one tenant holds (tests, metrics). */
  tenantStats(owner: string): { open: number; enroll: number; spent: number } {
    const t = this.tenants.get(owner);
    return { open: t?.open ?? 0, enroll: t?.enroll ?? 0, spent: t?.spent ?? 0 };
  }

  /**
   * Handle one relayed message. Outer failures (tampering, replay, unknown
   * channel) throw and change nothing; once a message authenticates, its
   * counter is spent and every outcome goes back encrypted.
   */
  async handle(
    ctx: CallerContext,
    method: ChannelMethod,
    p: z.output<typeof ChannelParams>,
  ): Promise<{ n: number; ct: string; outcome: string }> {
    const { channel: m, userId } = p;
    const id = toB64(m.id);
    const now = this.o.now();
    let ch = this.live.get(id);
    let fresh = false;
    if (m.n === 0) {
      if (!m.epk) throw new VaultError(ErrorCodes.BAD_REQUEST, 'the first channel message must carry epk');
      // Spent ids live in memory only, so a handshake must be younger than the window and
      // newer than this process: a capture can then not be replayed after a restart. The
      // lead is kept small because the relay can skew the clock it reports to clients.
      if (now - m.ts > this.o.freshnessMs || m.ts - now > (this.o.aheadMs ?? 5_000) || m.ts < this.startedAt) {
        throw new VaultError(ErrorCodes.STALE_MESSAGE, 'handshake timestamp outside the accepted window', { now });
      }
      if (!equalBytes(channelIdOf(m.epk), m.id)) throw new VaultError(ErrorCodes.BAD_REQUEST, 'channel id does not match epk');
      if (ch || this.spent.has(id)) throw new VaultError(ErrorCodes.REPLAY, 'this channel was already opened');
      validatePoint(m.epk);
      // The channel's slot before the HSM: a flood is refused here, at no cost, within its own tenant's quota.
      const enroll = method === 'enroll.begin';
      this.admit(ctx.tenant, enroll, now);
      try {
        const z = await this.vault.keys.channelAgree(m.epk);
        const keys = channelKeys(z, m.epk, this.vault.vaultId, this.vault.keys.channelPublic);
        ch = {
          keys,
          owner: ctx.tenant,
          enroll,
          namespace: ctx.namespace ?? LEGACY_NAMESPACE,
          userId,
          next: 0,
          step: 'new',
          busy: false,
          expiresAt: now + this.o.ttlMs,
          ts: m.ts,
        };
      } catch (e) {
        this.unadmit(ctx.tenant, enroll);
        throw e;
      }
      fresh = true;
    } else {
      if (m.epk) throw new VaultError(ErrorCodes.BAD_REQUEST, 'epk is only sent with the first message');
      // Another tenant's channel is as good as unknown to this one: it cannot step it (issue 14, R8).
      if (!ch || ch.owner !== ctx.tenant) {
        if (this.spent.get(id)?.owner === ctx.tenant) throw new VaultError(ErrorCodes.SESSION_EXPIRED, 'this channel is closed or expired');
        throw new VaultError(ErrorCodes.SESSION_NOT_FOUND, 'no open channel with this id');
      }
      if (now > ch.expiresAt) {
        this.close(id, ch);
        throw new VaultError(ErrorCodes.SESSION_EXPIRED, 'this channel expired');
      }
      if (m.n < ch.next) throw new VaultError(ErrorCodes.REPLAY, 'message counter already used');
      if (m.n > ch.next || ch.busy) throw new VaultError(ErrorCodes.OUT_OF_ORDER, 'message counter ahead of the channel');
      if (userId !== ch.userId) throw new VaultError(ErrorCodes.BAD_REQUEST, 'channel belongs to another user');
      if ((ctx.namespace ?? LEGACY_NAMESPACE) !== ch.namespace) throw new VaultError(ErrorCodes.BAD_REQUEST, 'channel belongs to another namespace');
    }
    const header = { channelId: m.id, counter: m.n, method, userId };
    let body: unknown;
    try {
      body = await openMessage(ch.keys.c2s, { ...header, dir: 'c2s', ts: m.ts }, m.ct);
      // Two copies of one handshake raced through the HSM call: only one opens the channel.
      if (fresh && (this.live.has(id) || this.spent.has(id))) throw new VaultError(ErrorCodes.REPLAY, 'this channel was already opened');
    } catch (e) {
      if (fresh) this.unadmit(ch.owner, ch.enroll);
      throw e;
    }
    if (fresh) {
      this.live.set(id, ch);
      const t = this.tenants.get(ch.owner)!;
      t.live.add(ch);
      if (ch.enroll) t.liveEnroll.add(ch);
    } else if (ch.busy || ch.next !== m.n) {
      throw new VaultError(ErrorCodes.OUT_OF_ORDER, 'message counter ahead of the channel');
    }
    ch.next = m.n + 1;
    ch.busy = true;
    let reply: Body;
    try {
      reply = { ok: true, result: await this.step(ctx, ch, method, body) };
    } catch (e) {
      if (!(e instanceof VaultError)) this.o.onInternalError?.(e);
      reply = { ok: false, error: publicError(e) };
    } finally {
      ch.busy = false;
    }
    if (ch.step === 'done') this.close(id, ch);
    const ct = await sealMessage(ch.keys.s2c, { ...header, dir: 's2c', ts: 0 }, reply);
    const outcome = reply.ok ? String((reply.result as { outcome?: string }).outcome ?? 'ok') : reply.error.code;
    return { n: m.n, ct: toB64(ct), outcome };
  }

  private async step(ctx: CallerContext, ch: Channel, method: ChannelMethod, raw: unknown): Promise<unknown> {
    if (!NEXT[ch.step][method]) {
      throw new VaultError(ErrorCodes.BAD_REQUEST, `${method} is not allowed at this point of the channel`);
    }
    const v = this.vault;
    switch (method) {
      case 'enroll.begin': {
        const b = parse(Bodies[method], raw);
        const r = await v.enrollBegin(ctx, ch.userId, b.blinded, b.grant ? { grant: b.grant } : {});
        ch.coreSession = r.sessionId;
        if (b.grant) ch.grant = b.grant;
        ch.step = 'enroll-begun';
        return { evaluated: toB64(r.evaluated), attemptLimit: r.attemptLimit, kdfFloor: r.kdfFloor };
      }
      case 'enroll.finish': {
        const b = parse(Bodies[method], raw);
        const r = await v.enrollFinish(ctx, ch.coreSession, ch.userId, { ...b, ...(ch.grant ? { grant: ch.grant } : {}) });
        ch.step = 'done';
        return r;
      }
      case 'recover.begin': {
        const b = parse(Bodies[method], raw);
        // b.guess: the SDK's id for this password guess, the same on every node it is sent to. A cohort
        // counts it once (core/vault.ts recoverBegin); a single node never sees a fail-over repeat.
        const r = await v.recoverBegin(ctx, ch.userId, b.blinded, b.guess);
        ch.coreSession = r.sessionId;
        ch.step = 'recover-begun';
        return { evaluated: toB64(r.evaluated), kdf: r.kdf, attemptsLeft: r.attemptsLeft, attemptLimit: r.attemptLimit };
      }
      case 'recover.finish': {
        const b = parse(Bodies[method], raw);
        let r;
        try {
          r = await v.recoverFinish(ctx, ch.coreSession, b.authKey);
        } catch (e) {
          // Only an HSM outage leaves the core session open for a retry; anything else ends it.
          if (!isVaultError(e, ErrorCodes.HSM_UNAVAILABLE)) ch.step = 'done';
          throw e;
        }
        ch.step = 'done';
        // The grant travels inside the channel: only this client can use it, on a new channel.
        if (r.outcome === 'ok') return { outcome: 'ok', envelope: toB64(r.envelope), grant: r.grant };
        return r.outcome === 'wrong-password' ? { outcome: r.outcome, attemptsLeft: r.attemptsLeft } : { outcome: r.outcome };
      }
    }
  }

  private close(id: string, ch: Channel): void {
    this.live.delete(id);
    const t = this.tenant(ch.owner);
    t.live.delete(ch);
    t.liveEnroll.delete(ch);
    this.spent.set(id, { until: Math.max(ch.expiresAt, ch.ts + this.o.freshnessMs) + 1000, owner: ch.owner });
    t.spent++;
    this.unadmit(ch.owner, ch.enroll);
  }

  /** Take a slot for a new channel of `owner`, or refuse before any work. */
  private admit(owner: string, enroll: boolean, now: number): void {
    const t = this.tenants.get(owner);
    const limited = (message: string, retryAfterMs: number) =>
      new VaultError(ErrorCodes.RATE_LIMITED, message, { retryAfterMs: Math.max(1, Math.min(retryAfterMs, this.o.ttlMs)) });
    if (t && enroll && t.enroll >= this.o.tenantEnrollChannels) {
      const first = t.liveEnroll.values().next().value;
      throw limited('too many unfinished enrolments for this tenant; retry later', first ? first.expiresAt - now + 1 : 1000);
    }
    if (t && t.open >= this.o.tenantChannels) {
      const first = t.live.values().next().value;
      throw limited('too many open channels for this tenant; retry later', first ? first.expiresAt - now + 1 : 1000);
    }
    // Closed ids age out continuously (the sweep runs every second).
    if (t && t.spent >= this.o.tenantClosedChannels) throw limited('too many recently closed channels for this tenant; retry later', 1000);
    if (this.admitted >= this.o.maxChannels) {
      const first = this.live.values().next().value;
      throw new VaultError(ErrorCodes.OVERLOADED, 'too many open channels; retry shortly', {
        retryAfterMs: Math.max(1, Math.min(first ? first.expiresAt - now + 1 : 1000, this.o.ttlMs)),
      });
    }
    const mine = this.tenant(owner);
    mine.open++;
    if (enroll) mine.enroll++;
    this.admitted++;
  }

  private unadmit(owner: string, enroll: boolean): void {
    const t = this.tenants.get(owner);
    if (!t) return;
    t.open--;
    if (enroll) t.enroll--;
    this.admitted--;
    this.forgetIfIdle(owner, t);
  }

  private tenant(owner: string): TenantChannels {
    let t = this.tenants.get(owner);
    if (!t) this.tenants.set(owner, (t = { open: 0, enroll: 0, spent: 0, live: new Set(), liveEnroll: new Set() }));
    return t;
  }

  private forgetIfIdle(owner: string, t: TenantChannels): void {
    if (t.open === 0 && t.spent === 0) this.tenants.delete(owner);
  }

  /**
   * Drop expired channels and forget spent ids whose handshake can no longer be fresh.
   * Both maps are walked from their oldest entry and the walk stops at the first one
   * still due, so a sweep costs what expired, not what the tables hold.
   */
  sweep(): void {
    const now = this.o.now();
    for (const [id, ch] of this.live) {
      if (now <= ch.expiresAt) break;
      if (!ch.busy) this.close(id, ch);
    }
    // Insertion order is close order; `until` is nearly but not strictly monotonic in it (it
    // depends on each handshake's ts), so an id may outlive its time by up to one retention
    // period behind a later one: kept longer, never forgotten early.
    for (const [id, s] of this.spent) {
      if (now <= s.until) break;
      this.spent.delete(id);
      const t = this.tenants.get(s.owner);
      if (t) {
        t.spent--;
        this.forgetIfIdle(s.owner, t);
      }
    }
  }
}

/** What a client may learn about a failure: the stable code, static text and non-secret detail. */
export function publicError(e: unknown): { code: string; message: string; detail?: unknown } {
  if (e instanceof VaultError) return { code: e.code, message: e.message, ...(e.detail ? { detail: e.detail } : {}) };
  return { code: ErrorCodes.INTERNAL, message: 'internal error' };
}
