// Short-lived, single-use protocol sessions held in memory. Losing them on a
// restart is safe: an unfinished recovery has already paid its attempt.
import { randomBytes } from 'node:crypto';
import { VaultError, ErrorCodes } from '../errors.js';

export type SessionKind = 'enroll' | 'recover' | 'grant';

export interface Session {
  id: string;
  kind: SessionKind;
  userId: string;
  /** recover/grant: the record generation it applies to; enroll: the generation it will create. */
  generation: number;
  expiresAt: number;
}

/** Expired sessions are remembered this long so a late finish says "expired", not "unknown". */
const TOMBSTONE_MS = 10 * 60_000;

export class SessionTable {
  private readonly byId = new Map<string, Session>();
  // Per-user index so pending-guess checks stay O(sessions of that user).
  private readonly byUser = new Map<string, Set<Session>>();

  constructor(
    private readonly ttlMs: number,
    private readonly max: number,
  ) {}

  get size(): number {
    return this.byId.size;
  }

  create(kind: SessionKind, userId: string, generation: number, now: number): Session {
    if (this.byId.size >= this.max) {
      throw new VaultError(ErrorCodes.OVERLOADED, 'too many open sessions; retry shortly');
    }
    const s: Session = { id: randomBytes(16).toString('base64url'), kind, userId, generation, expiresAt: now + this.ttlMs };
    this.add(s);
    return s;
  }

  private add(s: Session): void {
    this.byId.set(s.id, s);
    let set = this.byUser.get(s.userId);
    if (!set) this.byUser.set(s.userId, (set = new Set()));
    set.add(s);
  }

  private remove(s: Session): void {
    this.byId.delete(s.id);
    const set = this.byUser.get(s.userId);
    if (!set) return;
    set.delete(s);
    if (set.size === 0) this.byUser.delete(s.userId);
  }

  /** Remove and return a live session of `kind`: a session can be finished once. */
  take(id: string, kind: SessionKind, now: number): Session {
    const s = this.byId.get(id);
    if (!s || s.kind !== kind) throw new VaultError(ErrorCodes.SESSION_NOT_FOUND, `no ${kind} session with this id`);
    if (now > s.expiresAt) throw new VaultError(ErrorCodes.SESSION_EXPIRED, `the ${kind} session expired`);
    this.remove(s);
    return s;
  }

  /** Put back a session whose finish failed before deciding anything (e.g. HSM unavailable). */
  restore(s: Session): void {
    this.add(s);
  }

  /** Live recover sessions of a user other than `exceptId`: counted guesses still in flight. */
  pending(userId: string, now: number, exceptId?: string): number {
    let n = 0;
    for (const s of this.byUser.get(userId) ?? []) {
      if (s.kind === 'recover' && s.id !== exceptId && now <= s.expiresAt) n++;
    }
    return n;
  }

  /** Drop every live session of a user (after a reset, a re-enrolment or a delete). */
  cancelUser(userId: string, kinds: SessionKind[]): void {
    for (const s of [...(this.byUser.get(userId) ?? [])]) if (kinds.includes(s.kind)) this.remove(s);
  }

  /** Forget long-expired sessions; return recover sessions that just expired, once each. */
  sweep(now: number): Session[] {
    const expired: Session[] = [];
    for (const s of [...this.byId.values()]) {
      if (now > s.expiresAt + TOMBSTONE_MS) this.remove(s);
      else if (now > s.expiresAt && s.kind === 'recover' && !(s as { swept?: true }).swept) {
        (s as { swept?: true }).swept = true;
        expired.push(s);
      }
    }
    return expired;
  }
}
