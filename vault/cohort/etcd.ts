// The one place that creates an etcd client for the vault, with its fault
// handling set on purpose (see /work/shared/design/COHORT.md and the etcd memo).
//
// etcd3's defaults put a circuit breaker on each host (open for 5 s after 3
// failures) under a 3-try retry: a ~1 s leader election became an 8 s write
// outage. Here instead:
//   - no breaker: a dead host costs one refused connection per call, which is
//     cheap on a LAN and never hides a live host for seconds;
//   - every unary attempt has its own deadline (attemptTimeoutMs, default 1 s),
//     so a call parked on a member that lost its leader comes back quickly;
//   - the client retries by itself, with jittered exponential backoff and
//     within a total budget, ONLY failures that prove the request never took
//     effect (no connection, no leader, proposal dropped, too many requests).
//     Each retry goes to another host. Anything whose effect is unknown goes
//     back to the caller marked as such (failureKind): a vault writer must
//     re-read and decide again, never guess;
//   - calls and watch streams carry etcd's require-leader metadata, so a member
//     cut off from its quorum refuses them ("no leader") instead of serving a
//     stale watch that never advances; etcd3 then reconnects the watch elsewhere.
import { InterceptingCall, type Interceptor } from '@grpc/grpc-js';
import { ExponentialBackoff, noop } from 'cockatiel';
import { ClientClosedError, Etcd3, type IOptions } from 'etcd3';
import { ErrorCodes, VaultError } from '../../protocol/errors.js';

type Policy = NonNullable<NonNullable<IOptions['faultHandling']>['global']>;
type WatchBackoff = NonNullable<NonNullable<IOptions['faultHandling']>['watchBackoff']>;

export interface EtcdClientOptions {
  /** Deadline of one attempt of a unary call. Override per call with `.options({ deadline })` for long ranges. */
  attemptTimeoutMs?: number;
  /** Total time one call may spend retrying failures that surely did not apply. */
  retryBudgetMs?: number;
  /** First backoff step; doubles per retry up to maxBackoffMs, with jitter. */
  backoffMs?: number;
  maxBackoffMs?: number;
  /** Config path named in validation errors. */
  field?: string;
  /** TLS material for https:// endpoints (etcd's client CA, and a client cert if etcd demands one). */
  tls?: { ca: Buffer; cert?: Buffer; key?: Buffer };
  auth?: { username: string; password: string };
}

export const ETCD_DEFAULTS = { attemptTimeoutMs: 1_000, retryBudgetMs: 3_000, backoffMs: 25, maxBackoffMs: 250 } as const;

const ENDPOINT = /^(https?):\/\/(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})\/?$/;

/**
 * Checks the endpoint list and returns it normalised (no trailing slash).
 * Messages name the field and index but never echo a value: a URL may carry
 * credentials (user:pass@), which this refuses anyway.
 */
export function validateEndpoints(endpoints: unknown, field = 'cohort.etcd.endpoints'): string[] {
  const bad = (msg: string) => new VaultError(ErrorCodes.BAD_REQUEST, `config: ${msg}`);
  if (!Array.isArray(endpoints) || endpoints.length === 0) throw bad(`${field} must list at least one http(s)://host:port`);
  const out: string[] = [];
  const schemes = new Set<string>();
  endpoints.forEach((e, i) => {
    const m = typeof e === 'string' ? ENDPOINT.exec(e.trim()) : null;
    const port = m ? Number(m[3]) : 0;
    if (!m || port < 1 || port > 65535) throw bad(`${field}[${i}] must be http(s)://host:port`);
    const url = `${m[1]}://${m[2]}:${port}`;
    if (out.includes(url)) throw bad(`${field}[${i}] repeats an earlier endpoint`);
    schemes.add(m[1]!);
    out.push(url);
  });
  if (schemes.size > 1) throw bad(`${field} must all use http:// or all https://, not a mix`);
  return out;
}

export type FailureKind = 'not-applied' | 'ambiguous';

// Failures that prove the request never reached raft, matched on the message
// because etcd3 rebuilds gRPC errors from their text (the code is lost).
const NOT_APPLIED_TRANSIENT = [
  'No connection established', // grpc-js: the channel never connected, nothing was sent
  'connect ECONNREFUSED',
  'etcdserver: no leader', // require-leader check, before the request is processed
  'raft proposal dropped', // a follower without a leader drops the proposal locally
  'etcdserver: too many requests', // refused before proposing: apply lags commit
];
const NOT_APPLIED_PERMANENT = [
  'etcdserver: mvcc: database space exceeded', // quota alarm: puts are refused
  'etcdserver: request is too large',
  'etcdserver: too many operations in txn request',
  'etcdserver: duplicate key given in txn request',
  'etcdserver: key is not provided',
  'etcdserver: permission denied',
  'etcdserver: user name is empty',
  'etcdserver: invalid auth token',
  'etcdserver: not capable',
  'mvcc: required revision has been compacted',
  'mvcc: required revision is a future revision',
];

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** The request surely did not apply, and trying again (elsewhere, a little later) may work. */
export function isTransientNotApplied(err: unknown): boolean {
  const m = message(err);
  return NOT_APPLIED_TRANSIENT.some((s) => m.includes(s));
}

/**
 * What a failed call did to etcd's state: 'not-applied' when the error proves
 * nothing was written; 'ambiguous' otherwise (deadline exceeded, connection
 * lost mid-call, request timed out, anything unrecognised): the write may or
 * may not have applied, and only a read (of a request id the write carried)
 * can tell. A compare that failed is not an error: see commitOutcome().
 */
export function failureKind(err: unknown): FailureKind {
  if (err instanceof ClientClosedError) return 'not-applied';
  const m = message(err);
  if (NOT_APPLIED_TRANSIENT.some((s) => m.includes(s)) || NOT_APPLIED_PERMANENT.some((s) => m.includes(s))) return 'not-applied';
  return 'ambiguous';
}

export type CommitOutcome<T> =
  | { outcome: 'applied'; response: T }
  | { outcome: 'compare-failed'; response: T }
  | { outcome: 'not-applied'; error: Error }
  | { outcome: 'ambiguous'; error: Error };

/** Runs a txn and says which of the four things happened. */
export async function commitOutcome<T extends { succeeded: boolean }>(txn: Promise<T>): Promise<CommitOutcome<T>> {
  try {
    const response = await txn;
    return response.succeeded ? { outcome: 'applied', response } : { outcome: 'compare-failed', response };
  } catch (e) {
    const error = e instanceof Error ? e : new Error(String(e));
    return failureKind(error) === 'not-applied' ? { outcome: 'not-applied', error } : { outcome: 'ambiguous', error };
  }
}

/** Retries only surely-not-applied failures, with backoff, until the budget is spent. */
function boundedRetry(o: Required<Pick<EtcdClientOptions, 'retryBudgetMs' | 'backoffMs' | 'maxBackoffMs'>>): Policy {
  return {
    _altReturn: undefined as never,
    onSuccess: noop.onSuccess,
    onFailure: noop.onFailure,
    async execute(fn, signal = new AbortController().signal) {
      const start = Date.now();
      for (let attempt = 0; ; attempt++) {
        try {
          return await fn({ signal });
        } catch (e) {
          const step = Math.min(o.maxBackoffMs, o.backoffMs * 2 ** attempt);
          const delay = step / 2 + Math.random() * (step / 2);
          if (!isTransientNotApplied(e) || signal.aborted || Date.now() - start + delay > o.retryBudgetMs) throw e;
          await new Promise((r) => setTimeout(r, delay));
        }
      }
    },
  };
}

/** Adds etcd's require-leader metadata (rpctypes.MetadataRequireLeaderKey) to every call. */
const requireLeader: Interceptor = (options, nextCall) =>
  new InterceptingCall(nextCall(options), {
    start(metadata, listener, next) {
      metadata.set('hasleader', 'true');
      next(metadata, listener);
    },
  });

export function connectEtcd(endpoints: string[], opts: EtcdClientOptions = {}): Etcd3 {
  const hosts = validateEndpoints(endpoints, opts.field);
  const o = { ...ETCD_DEFAULTS, ...opts };
  for (const k of ['attemptTimeoutMs', 'retryBudgetMs', 'backoffMs', 'maxBackoffMs'] as const) {
    if (!Number.isFinite(o[k]) || o[k] <= 0) throw new VaultError(ErrorCodes.BAD_REQUEST, `config: cohort.etcd.${k} must be a positive number of ms`);
  }
  if (hosts[0]!.startsWith('https:') && !opts.tls) {
    // etcd3 would fall back to the system roots; a cohort pins its own etcd CA.
    throw new VaultError(ErrorCodes.BAD_REQUEST, 'config: cohort.etcd.tls.ca is required with https:// endpoints');
  }
  return new Etcd3({
    hosts,
    ...(opts.tls ? { credentials: { rootCertificate: opts.tls.ca, privateKey: opts.tls.key, certChain: opts.tls.cert } } : {}),
    ...(opts.auth ? { auth: opts.auth } : {}),
    // Each attempt gets its own deadline: the factory runs per attempt. Streams
    // (watch, lease keep-alive) have none: they live as long as they are wanted.
    defaultCallOptions: (ctx) =>
      ctx.isStream ? { interceptors: [requireLeader] } : { deadline: Date.now() + o.attemptTimeoutMs, interceptors: [requireLeader] },
    faultHandling: {
      host: () => noop,
      global: boundedRetry(o),
      // A broken watch stream reconnects within 50 ms..1 s, not etcd3's default of up to 30 s.
      // etcd3 types this as a backoff but calls .next() on it first, as on a factory.
      watchBackoff: new ExponentialBackoff({ initialDelay: 50, maxDelay: 1_000 }) as unknown as WatchBackoff,
    },
    grpcOptions: {
      // Notice a member that stopped answering (SIGSTOP, a cut cable) on open
      // streams. etcd refuses pings closer than 5 s (--grpc-keepalive-min-time).
      'grpc.keepalive_time_ms': 10_000,
      'grpc.keepalive_timeout_ms': 5_000,
    },
  });
}
