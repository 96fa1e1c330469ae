// Short-lived, single-use protocol sessions held in memory. Losing them on a
// restart is safe: an unfinished recovery has already paid its attempt.
//
// Capacity (issue 14, finding 1). A session holds a slot from the moment it is
// reserved — before any HSM work or commit that needs it — until it is
// finished, cancelled or expired, so a full table refuses a request before the
// request changes anything. Slots are counted globally (the memory bound), per
// tenant, and, separately and smaller, per tenant for enrolments: one tenant's
// unfinished enrolments cannot crowd out its own users' recoveries, nor anyone
// else's. An expired session gives its slot back at once; its id stays as a
// tombstone, so a late finish hears SESSION_EXPIRED rather than
// SESSION_NOT_FOUND, in a table of its own that is bounded and counts against
// nothing. Every operation is O(1) (amortised over expiries), whatever the
// table holds.
import { randomBytes } from 'node:crypto';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';

export type SessionKind = 'enroll' | 'recover' | 'grant';

export interface Session {
  readonly id: string;
  readonly kind: SessionKind;
  /** The tenant whose quota the session counts against. */
  readonly owner: string;
  readonly userId: string;
  /** recover/grant: the record generation it applies to; enroll: the generation it will create. */
  readonly generation: number;
  readonly expiresAt: number;
}

/**
 * A session's slot. Reserved → open (a live session) → taken by its finish →
 * restored, re-opened (a recovery's slot becomes its grant) or released.
 */
export type Slot = Session;

export interface SessionLimits {
  ttlMs: number;
  /** Slots in all (live, reserved and being finished): the memory bound. Enrolments may hold at most half. */
  max: number;
  /** Slots per tenant. */
  tenantMax: number;
  /** Enrolment slots per tenant (enroll.begin without its finish). */
  tenantEnrollMax: number;
}

export interface SessionStats {
  /** Slots held: live sessions, reservations and sessions being finished. */
  held: number;
  /** Of those, enrolments. */
  enroll: number;
  live: number;
  tombstones: number;
  /** Tenants holding at least one slot. */
  tenants: number;
}

type State = 'reserved' | 'live' | 'taken' | 'free';

class Held implements Session {
  id = '';
  userId = '';
  generation = 0;
  expiresAt = 0;
  state: State = 'reserved';
  constructor(
    public kind: SessionKind,
    readonly owner: string,
  ) {}
}

interface TenantSlots {
  held: number;
  enroll: number;
  /** Live sessions in creation order: the first expires first (for retryAfterMs). */
  live: Set<Held>;
  liveEnroll: Set<Held>;
}

/** Expired sessions are remembered this long so a late finish says "expired", not "unknown". */
const TOMBSTONE_MS = 10 * 60_000;

export class SessionTable {
  /** Live sessions by id, in creation order (= expiry order: every session gets the same TTL). */
  private readonly live = new Map<string, Held>();
  // Per-user index so pending-guess checks stay O(sessions of that user).
  private readonly byUser = new Map<string, Set<Held>>();
  private readonly tenants = new Map<string, TenantSlots>();
  /** Ids of expired sessions, oldest first; at most `limits.max`, counted against nothing. */
  private readonly tombs = new Map<string, { kind: SessionKind; until: number }>();
  /** Recover sessions that expired, for sweep() to hand to the vault once each. */
  private expiredRecover: Session[] = [];
  private held = 0;
  private heldEnroll = 0;

  constructor(private readonly limits: SessionLimits) {}

  get size(): number {
    return this.live.size;
  }

  stats(): SessionStats {
    return { held: this.held, enroll: this.heldEnroll, live: this.live.size, tombstones: this.tombs.size, tenants: this.tenants.size };
  }

  /** Slots a tenant holds (tests, metrics). */
  tenantStats(owner: string): { held: number; enroll: number } {
    const t = this.tenants.get(owner);
    return { held: t?.held ?? 0, enroll: t?.enroll ?? 0 };
  }

  /**
   * Reserve a slot for a session of `kind`, or refuse: RATE_LIMITED when the tenant
   * used its own quota, OVERLOADED when the vault as a whole is full; both with
   * retryAfterMs, the time until the oldest session in the way expires.
   */
  reserve(owner: string, kind: SessionKind, now: number): Slot {
    this.expire(now);
    const t = this.tenants.get(owner);
    if (kind === 'enroll' && (t?.enroll ?? 0) >= this.limits.tenantEnrollMax) {
      throw this.refuse(ErrorCodes.RATE_LIMITED, 'too many unfinished enrolments for this tenant; retry later', t?.liveEnroll, now);
    }
    if ((t?.held ?? 0) >= this.limits.tenantMax) {
      throw this.refuse(ErrorCodes.RATE_LIMITED, 'too many open sessions for this tenant; retry later', t?.live, now);
    }
    // Enrolments of all tenants together leave at least half the table to recoveries.
    if ((kind === 'enroll' && this.heldEnroll >= Math.floor(this.limits.max / 2)) || this.held >= this.limits.max) {
      throw this.refuse(ErrorCodes.OVERLOADED, 'too many open sessions; retry shortly', this.live.values(), now);
    }
    const s = new Held(kind, owner);
    this.count(s, 1);
    return s;
  }

  /** Make a reserved (or taken) slot a live session with a fresh id. Never refuses: the slot is already held. */
  open(slot: Slot, kind: SessionKind, userId: string, generation: number, now: number): Session {
    const s = slot as Held;
    if (s.state !== 'reserved' && s.state !== 'taken') throw new Error(`open() on a ${s.state} slot`);
    if (kind !== s.kind) {
      // A recovery's slot becomes its grant; only the enrolment counts tell kinds apart.
      const d = (kind === 'enroll' ? 1 : 0) - (s.kind === 'enroll' ? 1 : 0);
      const t = this.tenants.get(s.owner)!;
      t.enroll += d;
      this.heldEnroll += d;
      s.kind = kind;
    }
    s.id = randomBytes(16).toString('base64url');
    s.userId = userId;
    s.generation = generation;
    s.expiresAt = now + this.limits.ttlMs;
    this.add(s);
    return s;
  }

  /** Give a slot back, whatever became of it (a live session is dropped). Idempotent. */
  release(slot: Slot): void {
    const s = slot as Held;
    if (s.state === 'free') return;
    if (s.state === 'live') this.remove(s);
    this.count(s, -1);
    s.state = 'free';
  }

  /**
   * Take a live session of `kind` for its finish: a session can be finished once. Its
   * slot stays held until the caller restores, re-opens or releases it.
   */
  take(id: string, kind: SessionKind, now: number): Session {
    const s = this.find(id, kind, now);
    this.remove(s);
    s.state = 'taken';
    return s;
  }

  /** A live session of `kind`, left in place (a grant presented at enroll.begin). */
  peek(id: string, kind: SessionKind, now: number): Session {
    return this.find(id, kind, now);
  }

  /** Put back a session whose finish failed before deciding anything (e.g. HSM unavailable). */
  restore(session: Session): void {
    const s = session as Held;
    if (s.state !== 'taken') throw new Error(`restore() on a ${s.state} slot`);
    this.add(s);
  }

  /** Live recover sessions of a user: counted guesses still in flight. */
  pending(userId: string, now: number): number {
    let n = 0;
    for (const s of this.byUser.get(userId) ?? []) if (s.kind === 'recover' && now <= s.expiresAt) n++;
    return n;
  }

  /** Drop every live session of a user (after a reset, a re-enrolment or a delete). */
  cancelUser(userId: string, kinds: SessionKind[]): void {
    for (const s of [...(this.byUser.get(userId) ?? [])]) if (kinds.includes(s.kind)) this.release(s);
  }

  /** Expire what is due; return recover sessions that expired since the last call, once each. */
  sweep(now: number): Session[] {
    this.expire(now);
    const out = this.expiredRecover;
    this.expiredRecover = [];
    return out;
  }

  private find(id: string, kind: SessionKind, now: number): Held {
    this.expire(now);
    const s = this.live.get(id);
    if (s && s.kind === kind) {
      // Live but past its expiry: restored after its successors, expire() reaches it later.
      if (now > s.expiresAt) throw new VaultError(ErrorCodes.SESSION_EXPIRED, `the ${kind} session expired`);
      return s;
    }
    const tomb = s ? undefined : this.tombs.get(id);
    if (tomb?.kind === kind) throw new VaultError(ErrorCodes.SESSION_EXPIRED, `the ${kind} session expired`);
    throw new VaultError(ErrorCodes.SESSION_NOT_FOUND, `no ${kind} session with this id`);
  }

  /** Retire expired sessions (oldest first, so the work is proportional to what expired) and old tombstones. */
  private expire(now: number): void {
    for (const s of this.live.values()) {
      if (now <= s.expiresAt) break;
      this.release(s);
      this.tombs.set(s.id, { kind: s.kind, until: s.expiresAt + TOMBSTONE_MS });
      if (this.tombs.size > this.limits.max) this.tombs.delete(this.tombs.keys().next().value!);
      // Bounded like the table: a vault whose sweeper never runs (a tool) must not grow it
      // forever. A record whose last guess expired unswept is destroyed by its next begin.
      if (s.kind === 'recover' && this.expiredRecover.length < this.limits.max) this.expiredRecover.push(s);
    }
    for (const [id, t] of this.tombs) {
      if (now <= t.until) break;
      this.tombs.delete(id);
    }
  }

  private add(s: Held): void {
    s.state = 'live';
    this.live.set(s.id, s);
    let set = this.byUser.get(s.userId);
    if (!set) this.byUser.set(s.userId, (set = new Set()));
    set.add(s);
    const t = this.tenants.get(s.owner)!;
    t.live.add(s);
    if (s.kind === 'enroll') t.liveEnroll.add(s);
  }

  private remove(s: Held): void {
    this.live.delete(s.id);
    const set = this.byUser.get(s.userId);
    if (set) {
      set.delete(s);
      if (set.size === 0) this.byUser.delete(s.userId);
    }
    const t = this.tenants.get(s.owner);
    t?.live.delete(s);
    t?.liveEnroll.delete(s);
  }

  private count(s: Held, d: 1 | -1): void {
    let t = this.tenants.get(s.owner);
    if (!t) this.tenants.set(s.owner, (t = { held: 0, enroll: 0, live: new Set(), liveEnroll: new Set() }));
    t.held += d;
    this.held += d;
    if (s.kind === 'enroll') {
      t.enroll += d;
      this.heldEnroll += d;
    }
    if (t.held === 0) this.tenants.delete(s.owner);
  }

  private refuse(code: 'RATE_LIMITED' | 'OVERLOADED', message: string, oldest: Iterable<Held> | undefined, now: number): VaultError {
    let first: Held | undefined;
    for (const s of oldest ?? []) {
      first = s;
      break;
    }
    // Nothing live in the way (all in flight): they finish within a request's time.
    const retryAfterMs = first ? Math.max(1, Math.min(first.expiresAt - now + 1, this.limits.ttlMs)) : 1000;
    return new VaultError(ErrorCodes[code], message, { retryAfterMs });
  }
}
