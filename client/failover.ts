// Fail-over between the nodes of one vault (a cohort: same keys, same pinned
// key, shared state). Pure policy, browser-safe: which errors move a client to
// another node, which steps may be repeated there, node order and backoff.
// VaultClient (sdk.ts) applies it; docs/RPC.md#fail-over explains the rules.
//
// Why the client and not a transport: a channel is bound to the node that did
// its handshake, so moving means starting the enrolment or recovery again on a
// new channel. Only the client knows where a flow stands; a Transport sees
// ciphertext.
import { ErrorCodes, VaultError, type ErrorCode } from '../protocol/errors.js';

/**
 * The node, not the request, is the problem: another node of the cohort may
 * serve it. Everything else (a wrong password, a locked or absent record, a bad
 * request, a bad token, a rate limit on the caller's budget) would be answered
 * the same way by every node, or is the caller's to fix.
 */
export const FAILOVER_CODES: ReadonlySet<ErrorCode> = new Set<ErrorCode>([
  ErrorCodes.VAULT_UNREACHABLE, // refused, closed (1006, 1001 shutting down, 503 at the upgrade), timed out
  ErrorCodes.HSM_UNAVAILABLE,
  ErrorCodes.STORE_UNAVAILABLE,
  ErrorCodes.OVERLOADED, // also a node shutting down: "retry on another connection"
  ErrorCodes.STATE_ROLLBACK_DETECTED, // this node refuses to serve (docs/RPC.md: "send traffic elsewhere")
]);

/** The requests a VaultClient sends, plain RPC and channel steps alike. */
export type Step =
  | 'vault.descriptor'
  | 'record.status'
  | 'record.delete'
  | 'enroll.begin'
  | 'enroll.finish'
  | 'recover.begin'
  | 'recover.finish';

/**
 * What became of a step that failed:
 * - `refused`: it never reached the vault (the connection failed before it was
 *   sent), or the vault refused it with an outer JSON-RPC error, which it
 *   answers before acting on the message (docs/RPC.md);
 * - `answered`: the vault ran it and reported the error inside the channel;
 * - `unknown`: it was sent and no answer came (closed, timed out): it may or
 *   may not have taken effect.
 */
export type Fate = 'refused' | 'answered' | 'unknown';

/**
 * May this step be sent again, on another node, when the first try may have
 * taken effect? Only if doing it twice costs nothing more than doing it once:
 * - reads, and `enroll.begin` (an unfinished enrolment changes no record);
 * - not `recover.begin`, yet: it counts an attempt. The SDK already sends one
 *   guess id for all tries of a guess, but no vault counts a guess id once
 *   today (that comes with the cohort's shared pending guesses, issue 17);
 *   until then a repeat could spend two attempts on one password;
 * - not `recover.finish`: a decided guess leaves the record's pending list, so
 *   the begin a repeat needs would count the same password a second time;
 * - not `enroll.finish` (the record may already be replaced: a repeat is
 *   RECORD_EXISTS or uses a grant that is gone) nor `record.delete` (a repeat
 *   could delete a record enrolled in between); the caller decides, knowing.
 */
export const REPEATABLE_WHEN_UNKNOWN: Readonly<Record<Step, boolean>> = {
  'vault.descriptor': true,
  'record.status': true,
  'enroll.begin': true,
  'recover.begin': false,
  'recover.finish': false,
  'enroll.finish': false,
  'record.delete': false,
};

/**
 * What to do after a step failed: move to another node and start the
 * operation again (`failover`), give the error to the caller as is
 * (`surface`), or give it to the caller marked as of unknown outcome
 * (`unknown`) because repeating it could do it twice.
 */
export function afterFailure(step: Step, code: ErrorCode, fate: Fate): 'failover' | 'surface' | 'unknown' {
  if (!FAILOVER_CODES.has(code)) return 'surface';
  // HSM_UNAVAILABLE promises "nothing was done" except after a failed anchor write,
  // whose change stays committed (docs/SECURITY.md F5): as good as unknown.
  const mayHaveRun = fate === 'unknown' || code === ErrorCodes.HSM_UNAVAILABLE;
  if (mayHaveRun) return REPEATABLE_WHEN_UNKNOWN[step] ? 'failover' : 'unknown';
  // Refused before it ran, or answered STORE_UNAVAILABLE ("nothing was committed"),
  // OVERLOADED (refused before anything changes) or STATE_ROLLBACK_DETECTED (not served).
  return 'failover';
}

/** What a caller is told about a step that may or may not have taken effect. */
const CONSEQUENCE: Partial<Record<Step, string>> = {
  'recover.begin': 'the vault may have counted this password guess as an attempt; it was not retried, because a retry could count it twice',
  'recover.finish':
    'the vault may have decided this password guess; it was not retried, because a retry could count the same guess twice. Check the record status before trying again',
  'enroll.finish': 'the record may or may not have been replaced. Check the record status (or recover) before enrolling again',
  'record.delete': 'the record may or may not have been deleted. Check the record status',
};

export function outcomeUnknown(step: Step, e: VaultError): VaultError {
  const why = CONSEQUENCE[step] ?? 'it may or may not have taken effect';
  return new VaultError(e.code, `${e.message} (during ${step}: ${why})`, { ...e.detail, outcomeUnknown: true, step });
}

export interface FailoverEvent {
  /** Index (in the order given) of the node that failed, and of the node tried next. */
  from: number;
  to: number;
  step: Step;
  code: ErrorCode;
  /** Tries of this operation so far (1 = the first one failed). */
  attempt: number;
}

export interface FailoverOptions {
  /** Tries of one operation in all, across the nodes. Default: 1 with one transport (no fail-over), else 2 × nodes. */
  maxAttempts?: number;
  /** The node to start with: an index into the list, or 'random' (the default, spreads clients over the nodes). */
  first?: number | 'random';
  /** Backoff before a retry: full jitter under min(maxDelayMs, baseDelayMs × 2^(full passes over the nodes)). Default 100. */
  baseDelayMs?: number;
  /** Default 2 000. */
  maxDelayMs?: number;
  /** Told about every move to another node (metrics, logs). Must not throw. */
  onFailover?: (e: FailoverEvent) => void;
  /** In [0, 1); injectable for tests. Default Math.random (order and jitter are not secrets). */
  random?: () => number;
}

/**
 * The client's view of the nodes: which one it uses now (kept while it
 * answers), the next one after a failure, and how long to wait before trying.
 */
export class NodeRing {
  readonly size: number;
  readonly maxAttempts: number;
  private current: number;
  private readonly base: number;
  private readonly cap: number;
  private readonly random: () => number;

  constructor(size: number, o: FailoverOptions = {}) {
    const bad = (m: string) => new VaultError(ErrorCodes.BAD_REQUEST, `failover: ${m}`);
    if (!Number.isInteger(size) || size < 1) throw bad('at least one transport is needed');
    this.size = size;
    this.random = o.random ?? Math.random;
    this.maxAttempts = o.maxAttempts ?? (size === 1 ? 1 : 2 * size);
    if (!Number.isInteger(this.maxAttempts) || this.maxAttempts < 1 || this.maxAttempts > 100) throw bad('maxAttempts must be an integer from 1 to 100');
    this.base = o.baseDelayMs ?? 100;
    this.cap = o.maxDelayMs ?? 2_000;
    if (!(this.base >= 0) || !(this.cap >= 0)) throw bad('delays must be numbers ≥ 0');
    const first = o.first ?? 'random';
    if (first === 'random') this.current = Math.min(size - 1, Math.floor(this.random() * size));
    else if (Number.isInteger(first) && first >= 0 && first < size) this.current = first;
    else throw bad(`first must be 'random' or an index below ${size}`);
  }

  /** The node an operation starts on: the last one that did not fail. */
  get node(): number {
    return this.current;
  }

  /**
   * Node `failed` failed: move past it, unless a concurrent operation already
   * did (then follow it rather than skip a node). Returns the node to try next.
   */
  advance(failed: number): number {
    if (this.current === failed) this.current = (failed + 1) % this.size;
    return this.current;
  }

  /** Milliseconds to wait before try `tries + 1`; a node that named its own retry time is honoured when it is tried again. */
  delayMs(tries: number, e: VaultError, sameNode: boolean): number {
    const passes = Math.floor((tries - 1) / this.size);
    let ms = this.random() * Math.min(this.cap, this.base * 2 ** passes);
    const after = e.detail?.retryAfterMs;
    if (sameNode && typeof after === 'number' && after > 0) ms = Math.max(ms, Math.min(after, 5_000));
    return ms;
  }
}
