// The vault: orchestration of HSM, store and the pure decision logic. Each
// method is check input → ask the HSM → decide and commit in one SQLite
// transaction → only then reveal anything. Nothing here parses wire formats
// (rpc/ does) or touches pkcs11js or SQL directly (hsm/ and store/ do).
//
// Namespaces (issue 14): a public method takes a user id and the caller's
// namespace (CallerContext) and turns them into the record key at once
// (keyOf, core/namespace.ts). From there on, every `userId` of a record, a
// session, the ledger or a log reference is that key; only what goes back to
// the caller is the plain user id again.
import type { Logger } from 'pino';
import { VaultError, ErrorCodes, isVaultError } from '../../protocol/errors.js';
import type { VaultKeys } from '../hsm/vault-keys.js';
import type { StoredRecord } from '../store/records.js';
import type { Store } from '../store/index.js';
import { validatePoint } from '../../protocol/oprf.js';
import { checkKdfParams, MIN_KDF, type KdfParams } from '../../protocol/kdf.js';
import { sealAad, verifierInput } from './binding.js';
import { LEGACY_NAMESPACE, parseRecordKey, recordKey } from './namespace.js';
import { descriptorDigest, vaultIdOf, type SignedDescriptor } from '../../protocol/descriptor.js';
import { PROTOCOL_VERSION, SIZES } from '../../protocol/suite.js';
import { toHex } from '../../protocol/bytes.js';
import { checkBytes, checkUserId } from './input.js';
import { SessionTable, type Session, type SessionStats } from './sessions.js';
import { Ledger } from './ledger.js';
import { LocalRecordLog, type CohortRecordLog, type LogEntry, type PendingGuess, type RecordLog } from './record-log.js';
import type { CohortKeyring, CohortRotationResult } from '../cohort/keyring.js';
import { createHash, randomBytes } from 'node:crypto';
import { userRef } from './user-ref.js';
import type { CallerContext } from './caller.js';
import {
  decideDelete,
  decideEnroll,
  decideExpiry,
  decideRecoverBegin,
  decideRecoverFinish,
  type BeginDecision,
} from './machine.js';

export interface VaultOptions {
  /** Wrong guesses allowed before the record is destroyed (per record, fixed at enrolment). */
  attemptLimit: number;
  /** How long a begin may wait for its finish. */
  sessionTtlMs: number;
  /** Weakest Argon2id parameters an enrolment may use. */
  kdfFloor: KdfParams;
  /** Open sessions in all (the memory bound); enrolments may hold at most half. */
  maxSessions: number;
  /** Open sessions per tenant. */
  tenantSessions: number;
  /** Open enrolments (enroll.begin without its finish) per tenant; keep it well below tenantSessions. */
  tenantEnrollments: number;
  now: () => number;
}

export const DEFAULT_OPTIONS: VaultOptions = {
  attemptLimit: 10,
  sessionTtlMs: 120_000,
  kdfFloor: MIN_KDF,
  maxSessions: 100_000,
  tenantSessions: 20_000,
  tenantEnrollments: 5_000,
  now: Date.now,
};

export interface RecordStatus {
  userId: string;
  state: 'absent' | 'active' | 'locked' | 'deleted';
  attemptsLeft: number;
  attemptLimit: number;
}

export type RecoverOutcome =
  | { outcome: 'ok'; envelope: Uint8Array; grant: string }
  | { outcome: 'wrong-password'; attemptsLeft: number }
  | { outcome: 'locked' };

export { userRef };
export type { CallerContext };

export class Vault {
  readonly vaultId: Uint8Array;
  readonly options: VaultOptions;
  private readonly sessions: SessionTable;
  private descriptorCache: { epoch: number; value: SignedDescriptor } | undefined;
  private sweepTimer: NodeJS.Timeout | undefined;
  private rotating = false;
  /** Per user: recover.finish calls between taking their session and deciding (still pending guesses). */
  private readonly finishing = new Map<string, number>();
  /** The last anchor write failed: changes are committed but not anchored (see recoverBegin). */
  private anchorFailing = false;
  /** Where records are read and changed: this node's ledger, or the cohort (core/record-log.ts). */
  readonly records: RecordLog;
  /** Cohort mode: the id of the pending guess each live recover session put in its record. */
  private readonly guessOf = new Map<string, string>();
  /** Cohort mode: the cohort's seal epochs (cohort/keyring.ts), attached once the node joined. */
  private cohortKeys: CohortKeyring | undefined;

  private constructor(
    readonly keys: VaultKeys,
    readonly store: Store,
    readonly ledger: Ledger,
    private readonly log: Logger,
    options: Partial<VaultOptions>,
    records?: RecordLog,
  ) {
    this.records = records ?? new LocalRecordLog(ledger, () => this.anchored());
    this.options = { ...DEFAULT_OPTIONS, ...options };
    this.vaultId = vaultIdOf(keys.signingPublic);
    this.sessions = new SessionTable({
      ttlMs: this.options.sessionTtlMs,
      max: this.options.maxSessions,
      tenantMax: this.options.tenantSessions,
      tenantEnrollMax: this.options.tenantEnrollments,
    });
  }

  /** Bind the database to this HSM's vault, check it against the HSM anchor, and start. */
  static async open(
    keys: VaultKeys,
    store: Store,
    log: Logger,
    options: Partial<VaultOptions> = {},
    cohort?: (ledger: Ledger) => Promise<RecordLog>,
  ): Promise<Vault> {
    bindStore(store, vaultIdOf(keys.signingPublic));
    // Cohort mode (`cohort` given) keeps the single-node ledger open: it holds the node's HSM
    // anchor of the cohort state (cohort/node.ts), and health and status checks of the HSM
    // anchor keep working on it unchanged. Records come from the cohort.
    const ledger = await Ledger.open(store.records, keys, log);
    const records = cohort ? await cohort(ledger) : undefined;
    return new Vault(keys, store, ledger, log, options, records);
  }

  /** Cohort mode: seal under the cohort's epoch and rotate across the cohort (cohort/keyring.ts). */
  useCohortKeys(k: CohortKeyring): void {
    this.cohortKeys = k;
  }

  /** The epoch new seals use: the cohort's (every reachable node holds it), or this HSM's newest. */
  private sealingEpoch(): number {
    return this.cohortKeys?.sealingEpoch() ?? this.keys.currentEpoch();
  }

  /** Sweep expired sessions periodically (destroys records whose last guess was abandoned). */
  startSweeper(intervalMs = 1000): void {
    this.sweepTimer ??= setInterval(() => {
      this.sweep().catch((e: unknown) => this.log.error({ event: 'sweep.failed', err: (e as Error).message }, 'session sweep failed'));
    }, intervalMs);
    this.sweepTimer.unref();
  }

  /** How full the session table is (metrics, tests). */
  sessionStats(): SessionStats {
    return this.sessions.stats();
  }

  /** Slots one tenant holds (metrics, tests). */
  tenantSessionStats(tenant: string): { held: number; enroll: number } {
    return this.sessions.tenantStats(tenant);
  }

  close(): void {
    if (this.sweepTimer) clearInterval(this.sweepTimer);
    this.sweepTimer = undefined;
  }

  async descriptor(): Promise<SignedDescriptor> {
    const epoch = this.sealingEpoch();
    if (this.descriptorCache?.epoch === epoch) return this.descriptorCache.value;
    const d = {
      version: PROTOCOL_VERSION,
      vaultId: this.vaultId,
      channelKey: this.keys.channelPublic,
      epoch,
      attemptLimit: this.options.attemptLimit,
      kdfFloor: this.options.kdfFloor,
    };
    const value = { ...d, signature: await this.keys.sign(descriptorDigest(d)) };
    this.descriptorCache = { epoch, value };
    return value;
  }

  // ---- enrol -----------------------------------------------------------------

  async enrollBegin(
    ctx: CallerContext,
    userIdIn: unknown,
    blindedIn: unknown,
    opts: { grant?: string } = {},
  ): Promise<{ sessionId: string; evaluated: Uint8Array; attemptLimit: number; kdfFloor: KdfParams }> {
    const userId = keyOf(ctx, checkUserId(userIdIn));
    const blinded = validatePoint(checkBytes(blindedIn, SIZES.point, 'blinded'));
    // The session's slot first: a flood of unfinished enrolments is refused here, before the
    // database read and the HSM, and within its own tenant's enrolment quota.
    const slot = this.sessions.reserve(ctx.tenant, 'enroll', this.options.now());
    let opened = false;
    try {
      const grantGeneration = this.grantGeneration(opts.grant, userId);
      const got = this.current(userId);
      const decision = decideEnroll((got instanceof Promise ? await got : got).rec, grantGeneration);
      if (!decision.ok) throw refusal(decision.code);
      const evaluated = await this.keys.oprfEvaluate(blinded);
      const session = this.sessions.open(slot, 'enroll', userId, decision.generation, this.options.now());
      opened = true;
      this.log.info({ event: 'enroll.begin', user: userRef(userId) }, 'enrolment started');
      return { sessionId: session.id, evaluated, attemptLimit: this.options.attemptLimit, kdfFloor: this.options.kdfFloor };
    } finally {
      if (!opened) this.sessions.release(slot);
    }
  }

  async enrollFinish(
    ctx: CallerContext,
    sessionIdIn: unknown,
    userIdIn: unknown,
    req: { authKey: unknown; envelope: unknown; kdf: unknown; grant?: string },
  ): Promise<{ generation: number; attemptLimit: number }> {
    const userId = keyOf(ctx, checkUserId(userIdIn));
    const authKey = checkBytes(req.authKey, SIZES.authKey, 'authKey');
    const envelope = checkBytes(req.envelope, SIZES.envelope, 'envelope');
    const kdf = checkKdfParams(req.kdf, this.options.kdfFloor);
    const sessionId = checkSessionId(sessionIdIn);
    const now = this.options.now();
    const session = this.sessions.take(sessionId, 'enroll', now);
    // The taken session keeps its slot until it is restored or this finish is over.
    let restored = false;
    try {
      if (session.userId !== userId) throw new VaultError(ErrorCodes.SESSION_NOT_FOUND, 'no enroll session for this user');
      const generation = session.generation;
      const epoch = this.sealingEpoch();
      let verifier: Uint8Array;
      let sealed: Uint8Array;
      try {
        verifier = await this.keys.makeVerifier(verifierInput(this.vaultId, userId, generation, authKey));
        sealed = await this.keys.seal(epoch, sealAad(this.vaultId, userId, generation, epoch, verifier), envelope);
      } catch (e) {
        this.sessions.restore(session);
        restored = true;
        throw e;
      }
      return await this.commitEnrolment(userId, generation, { verifier, sealed, epoch, kdf, grant: req.grant, now });
    } finally {
      if (!restored) this.sessions.release(session);
    }
  }

  private async commitEnrolment(
    userId: string,
    generation: number,
    c: { verifier: Uint8Array; sealed: Uint8Array; epoch: number; kdf: KdfParams; grant: string | undefined; now: number },
  ): Promise<{ generation: number; attemptLimit: number }> {
    const { verifier, sealed, epoch, kdf, now } = c;
    const grantGeneration = this.grantGeneration(c.grant, userId);
    await this.records.update(userId, (cur) => {
      const decision = decideEnroll(cur.rec, grantGeneration);
      // Someone else enrolled this user while our HSM calls ran: our verifier is for a stale generation.
      if (!decision.ok || decision.generation !== generation) throw refusal(ErrorCodes.RECORD_EXISTS);
      // A new generation: guesses counted on the old one no longer hold anything off.
      const rec: StoredRecord = {
        userId,
        state: 'active',
        generation,
        attempts: 0,
        attemptLimit: this.options.attemptLimit,
        verifier,
        sealed,
        sealEpoch: epoch,
        kdf,
        createdAt: now,
        updatedAt: now,
      };
      return { next: { rec, guesses: [] }, result: undefined };
    });
    // Cohort: sealed under the old epoch while a rotation moved to re-sealing (this node had not
    // seen it yet): the rotation's pass may have gone by, so re-seal it here before answering.
    if (this.cohortKeys && epoch < this.cohortKeys.sealingEpoch()) await this.resealOne(userId, this.cohortKeys.sealingEpoch());
    // Old sessions and grants were for the previous generation.
    this.sessions.cancelUser(userId, ['recover', 'grant', 'enroll']);
    this.log.info({ event: 'enroll.finish', user: userRef(userId), generation }, 'record enrolled');
    return { generation, attemptLimit: this.options.attemptLimit };
  }

  // ---- recover ---------------------------------------------------------------

  async recoverBegin(
    ctx: CallerContext,
    userIdIn: unknown,
    blindedIn: unknown,
    guessIn?: unknown,
  ): Promise<{ sessionId: string; evaluated: Uint8Array; kdf: KdfParams; attemptsLeft: number; attemptLimit: number }> {
    const userId = keyOf(ctx, checkUserId(userIdIn));
    const blinded = validatePoint(checkBytes(blindedIn, SIZES.point, 'blinded'));
    // Cohort mode: the guess goes into the record itself, so every node counts it as pending.
    // Its id is the client's guess id bound to the blinded element: the SDK sends both again,
    // unchanged, when a node fails under a recovery, and the node it moves to finds the guess
    // already counted and counts it no second time (issue 17: "a retry must never spend two
    // attempts for one guess"). Bound to the blinded element, a replay can only repeat the
    // same password's evaluation: it yields nothing a new count would not.
    const guessId = this.records.mode !== 'cohort' ? '' : guessIn !== undefined ? guessKey(checkBytes(guessIn, 16, 'guess'), blinded) : randomBytes(12).toString('base64url');
    const replayOf = (cur: LogEntry, now: number): boolean =>
      !!guessId && cur.rec?.state === 'active' && live(cur.guesses, now).some((g) => g.id === guessId);
    // After a failed anchor write, count no new guess until the anchor has caught up:
    // otherwise a user retrying through an HSM storage outage spends an attempt per
    // try without ever getting an answer, until the record is destroyed
    // (test/integration/adversarial-hsm.test.ts). Fails with HSM_UNAVAILABLE, nothing counted.
    if (this.anchorFailing) await this.anchored();
    // Cheap refusal first, so locked or unknown users cost no HSM work.
    const got = this.current(userId);
    const peeked = got instanceof Promise ? await got : got;
    const replay = replayOf(peeked, this.options.now());
    const pre = replay ? undefined : decideRecoverBegin(peeked.rec, this.pendingIn(peeked, userId, this.options.now()), this.options.now());
    if (pre && !pre.ok && !pre.change) throw refusal(pre.code);
    // The session's slot before anything is counted: a full table refuses here, nothing
    // spent. (Before issue 14 the attempt was committed and only then did the table say
    // OVERLOADED, "retryable": ten honest retries destroyed the record unread.)
    const slot = replay || pre!.ok ? this.sessions.reserve(ctx.tenant, 'recover', this.options.now()) : undefined;
    let kept = false;
    let session = undefined as Session | undefined;
    try {
      // Evaluate before counting, reveal only after counting: an HSM failure costs no attempt,
      // and nothing that depends on the guess leaves before its attempt is durable.
      const evaluated = slot ? await this.keys.oprfEvaluate(blinded) : undefined;
      const now = this.options.now();
      // Commit before reveal: update() resolves once the attempt is durable and anchored
      // (single node) or quorum-committed and applied (cohort), before X leaves.
      const committed = await this.records.update(
        userId,
        (cur) => {
          if (slot && replayOf(cur, now)) {
            // Counted already, by the node that failed: a new session here, the same count, a fresh expiry.
            const rec = cur.rec!;
            const d: BeginDecision = { ok: true, change: rec, attemptsLeft: rec.attemptLimit - rec.attempts };
            return { next: { rec, guesses: [...live(cur.guesses, now, guessId), { id: guessId, expiresAt: now + this.options.sessionTtlMs }] }, result: d };
          }
          const d = decideRecoverBegin(cur.rec, this.pendingIn(cur, userId, now), now);
          // Counted only with its slot and evaluation in hand, so nothing after the commit can
          // refuse. (The row moved from "destroy" to "count" while we ran: nothing is written.)
          if (d.ok && !slot) throw new VaultError(ErrorCodes.OVERLOADED, 'the record changed while this request ran; retry');
          if (!d.change) return { result: d };
          const guesses = d.ok && guessId ? [...live(cur.guesses, now), { id: guessId, expiresAt: now + this.options.sessionTtlMs }] : d.ok ? live(cur.guesses, now) : [];
          return { next: { rec: d.change, guesses }, result: d };
        },
        // The counted guess is pending from its commit on, not only once its answer leaves:
        // otherwise a begin racing in while this one awaits the anchor sees the limit spent
        // and nothing pending, and destroys the record under a guess that may be right
        // (found by test/integration/adversarial-guessing.test.ts).
        (d) => {
          if (!d.ok) return;
          session = this.sessions.open(slot!, 'recover', userId, d.change.generation, now);
          if (guessId) this.guessOf.set(session.id, guessId);
        },
      );
      if (!committed.ok) {
        if (committed.change) this.log.warn({ event: 'record.locked', user: userRef(userId) }, 'record destroyed: attempt limit reached');
        throw refusal(committed.code);
      }
      kept = true;
      this.log.info({ event: 'recover.begin', user: userRef(userId), attemptsLeft: committed.attemptsLeft }, 'attempt counted');
      return {
        sessionId: session!.id,
        evaluated: evaluated!,
        kdf: committed.change.kdf!,
        attemptsLeft: committed.attemptsLeft,
        attemptLimit: committed.change.attemptLimit,
      };
    } finally {
      // A refusal, an HSM failure or a failed anchor write: the slot (and any session on it) goes.
      if (slot && !kept) this.sessions.release(slot);
      if (session && !kept) this.guessOf.delete(session.id);
    }
  }

  async recoverFinish(ctx: CallerContext, sessionIdIn: unknown, authKeyIn: unknown): Promise<RecoverOutcome & { userId: string }> {
    const authKey = checkBytes(authKeyIn, SIZES.authKey, 'authKey');
    const sessionId = checkSessionId(sessionIdIn);
    const session = this.sessions.take(sessionId, 'recover', this.options.now());
    // The taken session keeps its slot until this finish is decided: restored for a retry,
    // re-opened as the grant of a success (so a full table cannot refuse the grant after the
    // commit), or released.
    let kept = false;
    try {
      // A session of another namespace is not this caller's to finish: as if unknown, and left as it was.
      if (parseRecordKey(session.userId).namespace !== (ctx.namespace ?? LEGACY_NAMESPACE)) {
        this.sessions.restore(session);
        kept = true;
        throw new VaultError(ErrorCodes.SESSION_NOT_FOUND, 'no recover session with this id');
      }
      const r = await this.finishRecovery(session, authKey, () => (kept = true));
      // The caller named the user id; the record key stays inside the vault.
      return { ...r, userId: parseRecordKey(r.userId).userId };
    } finally {
      if (!kept) this.sessions.release(session);
    }
  }

  private async finishRecovery(
    session: Session,
    authKey: Uint8Array,
    keep: () => void,
  ): Promise<RecoverOutcome & { userId: string }> {
    const { userId, generation } = session;
    // Still a pending guess until decided below: a concurrent wrong finish must not destroy
    // the record while this one (maybe the right password) is being compared.
    this.finishing.set(userId, (this.finishing.get(userId) ?? 0) + 1);
    let finished = false;
    const doneFinishing = () => {
      if (finished) return;
      finished = true;
      const n = (this.finishing.get(userId) ?? 1) - 1;
      if (n > 0) this.finishing.set(userId, n);
      else this.finishing.delete(userId);
    };
    // Cohort mode: this guess's entry in the record; the finish removes it.
    const guessId = this.guessOf.get(session.id);
    let retry = false;
    let d: ReturnType<typeof decideRecoverFinish>;
    let envelope: Uint8Array | null = null;
    let now = this.options.now();
    try {
      const rec = this.records.peek(userId).rec;
      let verified = false;
      if (rec && rec.state === 'active' && rec.generation === generation && rec.verifier && rec.sealed) {
        try {
          // Unseal on either outcome, so a right and a wrong password cost the same HSM work and time;
          // both calls at once, so a worker pool takes them in one hop.
          const [ok, opened] = await Promise.all([
            this.keys.checkVerifier(verifierInput(this.vaultId, userId, generation, authKey), rec.verifier),
            this.unseal(rec),
          ]);
          verified = ok;
          if (verified) envelope = opened;
        } catch (e) {
          // Nothing was decided: the caller may finish this session again.
          if (isVaultError(e, ErrorCodes.HSM_UNAVAILABLE)) {
            this.sessions.restore(session);
            retry = true;
            keep();
          }
          throw e;
        }
      }
      now = this.options.now();
      const at = now;
      // Resolves once the outcome is durable and anchored (or quorum-committed): commit before reveal.
      d = await this.records.update(
        userId,
        (cur) => {
          const current = cur.rec;
          // Verified against the row we read; if the row changed meanwhile, decide on the new one.
          const same = current && rec && current.generation === rec.generation && sameBytes(current.verifier, rec.verifier);
          // Other pending guesses: live sessions and other finishes in progress (not this one).
          const pending = this.records.mode === 'cohort' ? live(cur.guesses, at, guessId).length : this.pendingGuesses(userId, at) - 1;
          const d = decideRecoverFinish(current, generation, verified && !!same, pending, at);
          // Write either way: a wrong password touches the record and the anchor like the
          // other outcomes, so neither the disk nor the answer's timing tells them apart.
          const write = d.ok ? (d.change ?? (current ? { ...current, updatedAt: at } : undefined)) : undefined;
          if (!write) return { result: d };
          const guesses = d.ok && d.outcome === 'locked' ? [] : live(cur.guesses, at, guessId);
          return { next: { rec: write, guesses }, result: d };
        },
        doneFinishing,
      );
    } finally {
      doneFinishing();
      if (!retry) this.guessOf.delete(session.id);
    }
    if (!d.ok) throw refusal(d.code);
    if (d.outcome === 'ok') {
      this.sessions.cancelUser(userId, ['recover', 'grant']);
      const grant = this.sessions.open(session, 'grant', userId, generation, now);
      keep();
      this.log.info({ event: 'recover.finish', user: userRef(userId), outcome: 'ok' }, 'password verified; attempts reset');
      return { outcome: 'ok', envelope: envelope!, grant: grant.id, userId };
    }
    if (d.outcome === 'locked') {
      this.sessions.cancelUser(userId, ['recover', 'grant', 'enroll']);
      this.log.warn({ event: 'record.locked', user: userRef(userId) }, 'record destroyed: attempt limit reached');
      return { outcome: 'locked', userId };
    }
    this.log.info({ event: 'recover.finish', user: userRef(userId), outcome: 'wrong-password', attemptsLeft: d.attemptsLeft }, 'wrong password');
    return { outcome: 'wrong-password', attemptsLeft: d.attemptsLeft, userId };
  }

  private async unseal(rec: StoredRecord): Promise<Uint8Array> {
    // Cohort: sealed under an epoch this node imported during a rotation but has not started using yet.
    if (this.cohortKeys && rec.sealEpoch !== null) await this.cohortKeys.ensure(rec.sealEpoch);
    const aad = sealAad(this.vaultId, rec.userId, rec.generation, rec.sealEpoch!, rec.verifier!);
    const out = rec.sealEpoch !== null ? await this.keys.unseal(rec.sealEpoch, aad, rec.sealed!) : null;
    if (!out || out.length !== SIZES.envelope) {
      this.log.error({ event: 'record.corrupt', user: userRef(rec.userId) }, 'sealed envelope does not authenticate');
      throw new VaultError(ErrorCodes.RECORD_CORRUPT, 'stored record does not authenticate; it was altered or its seal key is gone');
    }
    return out;
  }

  // ---- status, delete, expiry -------------------------------------------------

  /** `ctx` absent: the legacy namespace (in-process operator tools). */
  status(userIdIn: unknown, ctx?: CallerContext): RecordStatus {
    const userId = checkUserId(userIdIn);
    // Another namespace's record is a different key: a tenant without a grant sees "absent" (R6, R8).
    return statusOf(userId, this.records.peek(keyOf(ctx, userId)).rec, this.options.attemptLimit);
  }

  /** status() as of now: a cohort node answers only after applying etcd's current revision. */
  async currentStatus(userIdIn: unknown, ctx?: CallerContext): Promise<RecordStatus> {
    const userId = checkUserId(userIdIn);
    if (this.records.mode === 'single') return this.status(userId, ctx);
    return statusOf(userId, (await this.records.read(keyOf(ctx, userId))).rec, this.options.attemptLimit);
  }

  /** `ctx` absent: the legacy namespace (in-process operator tools). */
  async delete(userIdIn: unknown, ctx?: CallerContext): Promise<void> {
    const userId = keyOf(ctx, checkUserId(userIdIn));
    const now = this.options.now();
    await this.records.update(userId, (cur) => {
      const d = decideDelete(cur.rec, now);
      if (!d.ok) throw refusal(d.code);
      return { next: { rec: d.change, guesses: [] }, result: undefined };
    });
    this.sessions.cancelUser(userId, ['recover', 'grant', 'enroll']);
    this.log.info({ event: 'record.delete', user: userRef(userId) }, 'record deleted');
  }

  /** Destroy records whose final counted guess was abandoned. Returns how many. */
  async sweep(): Promise<number> {
    const now = this.options.now();
    let destroyedCount = 0;
    for (const s of this.sessions.sweep(now)) {
      const guessId = this.guessOf.get(s.id);
      this.guessOf.delete(s.id);
      const change = await this.records.update(s.userId, (cur) => {
        // Cohort: the expired guess ages out of the record by its own expiry; others may still be pending.
        const pending = this.records.mode === 'cohort' ? live(cur.guesses, now, guessId).length : this.pendingGuesses(s.userId, now);
        const c = decideExpiry(cur.rec, s.generation, pending, now);
        return c ? { next: { rec: c, guesses: [] }, result: c } : { result: c };
      });
      if (change) {
        destroyedCount++;
        this.log.warn({ event: 'record.locked', user: userRef(s.userId) }, 'record destroyed: last guess abandoned at the limit');
      }
    }
    // Cohort: a record whose last counted guess was abandoned because its node died. The node
    // that counted it does the above at its session's expiry; any node does this a little later.
    if (this.records.mode === 'cohort') {
      const log = this.records as CohortRecordLog;
      for (const userId of log.dueForExpiry(now - ORPHAN_GRACE_MS)) {
        const change = await this.records.update(userId, (cur) => {
          const c = cur.rec ? decideExpiry(cur.rec, cur.rec.generation, live(cur.guesses, now).length, now) : undefined;
          return c ? { next: { rec: c, guesses: [] }, result: c } : { result: c };
        });
        if (change) {
          destroyedCount++;
          this.log.warn({ event: 'record.locked', user: userRef(userId), orphaned: true }, 'record destroyed: last guess abandoned at the limit on a node that is gone');
        }
      }
    }
    return destroyedCount;
  }

  // ---- seal-epoch rotation ----------------------------------------------------

  /**
   * Re-seal every live record under a new seal epoch, then destroy the older
   * epochs' keys (C_DestroyObject): every database copy taken before the
   * rotation becomes cryptographically dead. Safe while serving (each record is
   * re-checked inside its transaction) and resumable: with `resume`, an
   * interrupted rotation is finished instead of a new one started.
   */
  async rotate(
    opts: { resume?: boolean; batchSize?: number; onProgress?: (done: number, remaining: number) => void } = {},
  ): Promise<{ epoch: number; resealed: number; unreadable: number; destroyedEpochs: number[] }> {
    if (this.rotating) throw new VaultError(ErrorCodes.BAD_REQUEST, 'a rotation is already running');
    if (this.records.mode === 'cohort') {
      throw new VaultError(ErrorCodes.BAD_REQUEST, 'a cohort node rotates through its running daemon (bkv-admin rotate with the daemon up: cohort/keyring.ts)');
    }
    this.rotating = true;
    try {
      const before = this.keys.epochs();
      if (!opts.resume || before.length === 1) {
        if (opts.resume) return { epoch: this.keys.currentEpoch(), resealed: 0, unreadable: 0, destroyedEpochs: [] };
        await this.keys.addEpoch(this.keys.currentEpoch() + 1);
      }
      const target = this.keys.currentEpoch();
      this.log.info({ event: 'rotate.start', epoch: target }, 'seal-epoch rotation started');
      let resealed = 0;
      const unreadable = new Set<string>();
      for (;;) {
        const batch = this.store.records
          .liveSealedBefore(target, (opts.batchSize ?? 256) + unreadable.size)
          .filter((r) => !unreadable.has(r.userId));
        if (batch.length === 0) break;
        for (const stale of batch) {
          const rec = this.ledger.get(stale.userId);
          if (!rec || rec.state !== 'active' || rec.sealEpoch === null || rec.sealEpoch >= target) continue;
          const envelope = await this.keys
            .unseal(rec.sealEpoch, sealAad(this.vaultId, rec.userId, rec.generation, rec.sealEpoch, rec.verifier!), rec.sealed!)
            .catch(() => null);
          if (!envelope) {
            unreadable.add(rec.userId);
            this.log.error({ event: 'rotate.unreadable', user: userRef(rec.userId) }, 'record does not unseal; left to be shredded');
            continue;
          }
          const sealed = await this.keys.seal(target, sealAad(this.vaultId, rec.userId, rec.generation, target, rec.verifier!), envelope);
          this.ledger.transaction(() => {
            const cur = this.ledger.get(rec.userId);
            // Changed meanwhile (re-enrolled, deleted, locked): the new state needs no re-seal from us.
            if (!cur || cur.state !== 'active' || cur.generation !== rec.generation || cur.sealEpoch !== rec.sealEpoch) return;
            this.ledger.put({ ...cur, sealed, sealEpoch: target, updatedAt: this.options.now() });
            resealed++;
          });
        }
        // Anchored before the old key can go: a crash here resumes, it never strands a record.
        await this.anchored();
        opts.onProgress?.(resealed, this.store.records.countSealedBefore(target) - unreadable.size);
      }
      const destroyedEpochs: number[] = [];
      for (const e of this.keys.epochs()) {
        if (e < target) {
          await this.keys.destroyEpoch(e);
          destroyedEpochs.push(e);
        }
      }
      this.descriptorCache = undefined;
      this.log.info(
        { event: 'rotate.done', epoch: target, resealed, unreadable: unreadable.size, destroyedEpochs },
        'seal-epoch rotation finished; older epoch keys destroyed',
      );
      return { epoch: target, resealed, unreadable: unreadable.size, destroyedEpochs };
    } finally {
      this.rotating = false;
    }
  }

  /**
   * Rotate the seal epoch across the cohort (cohort/keyring.ts): the new key
   * reaches every node's HSM through the key ceremony's bundles, this node
   * re-seals every live record through etcd, then every node destroys the older
   * keys. Nodes that were down do so at their next start, before serving.
   */
  async rotateCohort(opts: { resume?: boolean; waitMs?: number; onProgress?: (done: number, remaining: number) => void } = {}): Promise<CohortRotationResult> {
    const k = this.cohortKeys;
    if (!k || this.records.mode !== 'cohort') throw new VaultError(ErrorCodes.BAD_REQUEST, 'not a cohort node');
    if (this.rotating) throw new VaultError(ErrorCodes.BAD_REQUEST, 'a rotation is already running');
    this.rotating = true;
    try {
      const r = await k.rotate({
        ...(opts.resume !== undefined ? { resume: opts.resume } : {}),
        ...(opts.waitMs !== undefined ? { waitMs: opts.waitMs } : {}),
        reseal: (target) => this.resealCohort(target, opts.onProgress),
      });
      this.descriptorCache = undefined;
      return r;
    } finally {
      this.rotating = false;
    }
  }

  /** Re-seal every live cohort record under `target`, pass after pass until none is left under an older epoch. */
  private async resealCohort(target: number, onProgress?: (done: number, remaining: number) => void): Promise<{ resealed: number; unreadable: number }> {
    const log = this.records as CohortRecordLog;
    let resealed = 0;
    const unreadable = new Set<string>();
    // A node that sealed just before it saw the reseal phase lands its record after a pass:
    // one more pass after a pause longer than a node's apply lag picks it up.
    for (let quiet = 0; quiet < 2; ) {
      const stale = log.sealedBefore(target).filter((u) => !unreadable.has(u));
      if (stale.length === 0) {
        quiet++;
        if (quiet < 2) await new Promise((r) => setTimeout(r, 1_000));
        continue;
      }
      quiet = 0;
      for (const userId of stale) {
        const out = await this.resealOne(userId, target);
        if (out === 'unreadable') unreadable.add(userId);
        if (out === 'resealed') resealed++;
      }
      onProgress?.(resealed, log.sealedBefore(target).length - unreadable.size);
    }
    return { resealed, unreadable: unreadable.size };
  }

  /** One record under `target`, if it is live and older; 'unreadable' when it does not unseal. */
  private async resealOne(userId: string, target: number): Promise<'resealed' | 'unchanged' | 'unreadable'> {
    const rec = (await this.records.read(userId)).rec;
    if (!rec || rec.state !== 'active' || rec.sealEpoch === null || rec.sealEpoch >= target) return 'unchanged';
    const envelope = await this.keys
      .unseal(rec.sealEpoch, sealAad(this.vaultId, rec.userId, rec.generation, rec.sealEpoch, rec.verifier!), rec.sealed!)
      .catch(() => null);
    if (!envelope) {
      this.log.error({ event: 'rotate.unreadable', user: userRef(rec.userId) }, 'record does not unseal; left to be shredded');
      return 'unreadable';
    }
    const sealed = await this.keys.seal(target, sealAad(this.vaultId, rec.userId, rec.generation, target, rec.verifier!), envelope);
    return this.records.update(userId, (cur) => {
      const c = cur.rec;
      // Changed meanwhile (re-enrolled, deleted, locked): the new state needs no re-seal from us.
      if (!c || c.state !== 'active' || c.generation !== rec.generation || c.sealEpoch !== rec.sealEpoch) return { result: 'unchanged' as const };
      return { next: { rec: { ...c, sealed, sealEpoch: target, updatedAt: this.options.now() }, guesses: cur.guesses }, result: 'resealed' as const };
    });
  }

  /** ledger.sync(), remembering whether the last anchor write failed (see recoverBegin). */
  private async anchored(): Promise<void> {
    try {
      await this.ledger.sync();
      this.anchorFailing = false;
    } catch (e) {
      this.anchorFailing = true;
      throw e;
    }
  }

  /**
   * The record for a refusal that is answered before any commit: a cohort node reads
   * it as of etcd's current revision (a replica a few ms behind must not answer "not
   * found" for a user just enrolled on another node); a single node reads it at once,
   * as before (callers await only a promise: the pre-check and what follows stay in one turn).
   */
  private current(userId: string): LogEntry | Promise<LogEntry> {
    return this.records.mode === 'cohort' ? this.records.read(userId) : this.records.peek(userId);
  }

  /** Pending guesses for a decision on `cur`: shared in the record (cohort) or this node's own (single). */
  private pendingIn(cur: LogEntry, userId: string, now: number): number {
    return this.records.mode === 'cohort' ? live(cur.guesses, now).length : this.pendingGuesses(userId, now);
  }

  /** Counted guesses of a user not yet decided: live recover sessions plus finishes being compared. */
  private pendingGuesses(userId: string, now: number): number {
    return this.sessions.pending(userId, now) + (this.finishing.get(userId) ?? 0);
  }

  private grantGeneration(grant: string | undefined, userId: string): number | undefined {
    if (grant === undefined) return undefined;
    const s = this.sessions.peek(checkSessionId(grant), 'grant', this.options.now());
    return s.userId === userId ? s.generation : undefined;
  }
}

// A database belongs to exactly one vault identity: records of another vault
// would never verify, and silently mixing them hides an operator mistake.
function bindStore(store: Store, vaultId: Uint8Array): void {
  const id = toHex(vaultId);
  const bound = store.records.getMeta('vault_id');
  if (bound === undefined) store.records.setMeta('vault_id', id);
  else if (bound !== id) {
    throw new VaultError(ErrorCodes.STATE_ROLLBACK_DETECTED, `database belongs to vault ${bound}, not to this HSM's vault ${id}`);
  }
}

function statusOf(userId: string, rec: StoredRecord | undefined, attemptLimit: number): RecordStatus {
  if (!rec) return { userId, state: 'absent', attemptsLeft: 0, attemptLimit };
  return {
    userId,
    state: rec.state,
    attemptsLeft: rec.state === 'active' ? Math.max(0, rec.attemptLimit - rec.attempts) : 0,
    attemptLimit: rec.attemptLimit,
  };
}

/** How long after an orphaned guess's expiry another node destroys its record (the counting node goes first). */
const ORPHAN_GRACE_MS = 2_000;

/** A pending guess's id in cohort mode: the client's guess id bound to its blinded element. */
function guessKey(guess: Uint8Array, blinded: Uint8Array): string {
  return createHash('sha256').update('bkv-v1-guess').update(guess).update(blinded).digest().subarray(0, 16).toString('base64url');
}

/** Cohort mode: the guesses of a record still pending at `now`, without `except` (the caller's own). */
function live(guesses: readonly PendingGuess[], now: number, except?: string): PendingGuess[] {
  return guesses.filter((g) => g.expiresAt > now && g.id !== except);
}

/** The record key of a checked user id in the caller's namespace (core/namespace.ts). */
function keyOf(ctx: CallerContext | undefined, userId: string): string {
  return recordKey(ctx?.namespace ?? LEGACY_NAMESPACE, userId);
}

function checkSessionId(v: unknown): string {
  if (typeof v !== 'string' || !/^[A-Za-z0-9_-]{22}$/.test(v)) {
    throw new VaultError(ErrorCodes.SESSION_NOT_FOUND, 'sessionId is not a session id');
  }
  return v;
}

function sameBytes(a: Uint8Array | null, b: Uint8Array | null): boolean {
  return !!a && !!b && Buffer.from(a).equals(Buffer.from(b));
}

function refusal(code: VaultError['code']): VaultError {
  const messages: Partial<Record<VaultError['code'], string>> = {
    [ErrorCodes.RECORD_NOT_FOUND]: 'no record for this user',
    [ErrorCodes.LOCKED]: 'record is locked: the attempt limit was reached and the key destroyed',
    [ErrorCodes.RECORD_EXISTS]: 'an active record exists; prove the current password or delete it first',
    [ErrorCodes.SESSION_EXPIRED]: 'the record changed since this recovery began',
  };
  return new VaultError(code, messages[code] ?? code);
}
