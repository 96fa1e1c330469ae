// Prometheus metrics of one vault process, on its own registry (so tests can
// run several daemons in one process). Labels are method names, outcome codes
// and HSM operation names only: never a user id, a user ref, a tenant secret
// or anything derived from a password, so a scrape reveals traffic shape and
// health, nothing about any one user (threat model item 6).
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { isVaultError } from '../protocol/errors.js';
import type { VaultKeys } from './hsm/vault-keys.js';
import { decorateKeys } from './hsm/decorate.js';
import type { Handler } from './rpc/methods.js';
import type { RequestEvent } from './rpc/server.js';

/** What the scrape-time gauges read; set once the vault is open. */
export interface MetricsSource {
  records(): { active: number; locked: number; deleted: number };
  ledger(): { seq: number; anchored: number };
  epoch(): number;
  connections(): number;
  /** Entries of the bounded in-memory tables (docs/OPERATIONS.md "Limits and quotas"). */
  tables?(): Record<'sessions' | 'enrolments' | 'channels' | 'closed_channel_ids' | 'rate_buckets', number>;
  /** Cohort mode (cohort/node.ts): this node's id, applied revision, lag behind etcd and engine counters. */
  cohort?(): { node: string; applied: number; lag: number; txns: number; compareFailed: number; commits: number } | undefined;
}

const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

export class Metrics {
  readonly registry = new Registry();
  readonly requests: Counter<'method' | 'outcome'>;
  readonly requestSeconds: Histogram<'method'>;
  readonly inFlight: Gauge;
  readonly hsmSeconds: Histogram<'op'>;
  readonly hsmErrors: Counter<'op' | 'code'>;
  readonly hsmInFlight: Gauge;
  readonly hsmUp: Gauge;
  /** 1 when the start-up capability check wrapped a never-extractable key out of the token (vault/hsm/capabilities.ts). */
  readonly hsmKeysWrappable: Gauge;
  /** 1 when the vault serves anyway because the operator set hsm.acceptWrappableKeys. */
  readonly hsmWrappableAccepted: Gauge;
  readonly lockouts: Counter;
  readonly securityEvents: Counter<'event'>;
  readonly rollbacks: Counter;
  readonly anchorFailures: Counter;
  readonly authRefused: Counter;
  readonly ready: Gauge<'check'>;
  readonly readyEvaluations: Counter;
  readonly auditEvents: Counter;
  readonly auditCheckpoints: Counter;
  readonly auditErrors: Counter;
  readonly cohortCommitSeconds: Histogram;
  private source: MetricsSource | undefined;

  constructor(opts: { processMetrics?: boolean } = {}) {
    const r = [this.registry];
    if (opts.processMetrics ?? true) collectDefaultMetrics({ register: this.registry, prefix: 'bkv_' });
    this.requests = new Counter({ name: 'bkv_rpc_requests_total', help: 'RPC requests by method and outcome (ok, wrong-password, or an error code)', labelNames: ['method', 'outcome'], registers: r });
    this.requestSeconds = new Histogram({ name: 'bkv_rpc_request_duration_seconds', help: 'RPC request latency by method', labelNames: ['method'], buckets: LATENCY_BUCKETS, registers: r });
    this.inFlight = new Gauge({ name: 'bkv_rpc_in_flight', help: 'RPC requests being served right now (the request queue depth)', registers: r });
    this.hsmSeconds = new Histogram({ name: 'bkv_hsm_operation_duration_seconds', help: 'HSM operation latency by operation', labelNames: ['op'], buckets: LATENCY_BUCKETS, registers: r });
    this.hsmErrors = new Counter({ name: 'bkv_hsm_operation_errors_total', help: 'HSM operations that failed, by operation and error code', labelNames: ['op', 'code'], registers: r });
    this.hsmInFlight = new Gauge({ name: 'bkv_hsm_in_flight', help: 'HSM operations waiting or running (the HSM queue depth)', registers: r });
    this.hsmUp = new Gauge({ name: 'bkv_hsm_up', help: '1 while the HSM token answers, 0 when its session is lost', registers: r });
    this.hsmKeysWrappable = new Gauge({ name: 'bkv_hsm_keys_wrappable', help: '1 when the HSM let a never-extractable key out wrapped at the start-up check (the module ignores CKA_EXTRACTABLE)', registers: r });
    this.hsmWrappableAccepted = new Gauge({ name: 'bkv_hsm_wrappable_keys_accepted', help: '1 when the vault serves wrappable keys because the operator set hsm.acceptWrappableKeys', registers: r });
    this.lockouts = new Counter({ name: 'bkv_lockouts_total', help: 'records destroyed because the attempt limit was reached', registers: r });
    this.securityEvents = new Counter({ name: 'bkv_security_events_total', help: 'security events written to the audit log, by event', labelNames: ['event'], registers: r });
    this.rollbacks = new Counter({ name: 'bkv_rollback_detections_total', help: 'stored state found older than or different from the HSM anchor', registers: r });
    this.anchorFailures = new Counter({ name: 'bkv_anchor_write_failures_total', help: 'HSM anchor writes that failed (the batch stays unanswered)', registers: r });
    this.authRefused = new Counter({ name: 'bkv_auth_refused_total', help: 'connections refused at tenant authentication', registers: r });
    this.ready = new Gauge({ name: 'bkv_ready', help: 'last readiness result per check (1 ready, 0 not)', labelNames: ['check'], registers: r });
    this.readyEvaluations = new Counter({ name: 'bkv_ready_evaluations_total', help: 'readiness evaluations run (each /readyz within a second of the last reuses it)', registers: r });
    this.auditEvents = new Counter({ name: 'bkv_audit_events_total', help: 'lines appended to the audit log', registers: r });
    this.auditCheckpoints = new Counter({ name: 'bkv_audit_checkpoints_total', help: 'HSM-signed audit checkpoints written', registers: r });
    this.auditErrors = new Counter({ name: 'bkv_audit_write_errors_total', help: 'audit appends or checkpoints that failed', registers: r });
    this.cohortCommitSeconds = new Histogram({ name: 'bkv_cohort_commit_duration_seconds', help: 'cohort mode: a record change from its call to its quorum commit applied on this node', buckets: LATENCY_BUCKETS, registers: r });
    // prom-client calls collect() with the gauge as `this`; the registry's owner is needed too.
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const self = this;
    new Gauge({
      name: 'bkv_records',
      help: 'records in the database by state',
      labelNames: ['state'],
      registers: r,
      collect() {
        const c = self.safe(() => self.source?.records());
        if (!c) return;
        for (const [state, n] of Object.entries(c)) this.set({ state }, n);
      },
    });
    new Gauge({
      name: 'bkv_anchor_seq',
      help: 'batch number the HSM state anchor holds',
      registers: r,
      collect() {
        const l = self.safe(() => self.source?.ledger());
        if (l) this.set(l.anchored);
      },
    });
    new Gauge({
      name: 'bkv_anchor_lag_batches',
      help: 'committed batches not yet anchored in the HSM (0 when idle; stays up when anchor writes fail)',
      registers: r,
      collect() {
        const l = self.safe(() => self.source?.ledger());
        if (l) this.set(Math.max(0, l.seq - l.anchored));
      },
    });
    new Gauge({
      name: 'bkv_seal_epoch',
      help: 'current seal epoch (moves on rotation)',
      registers: r,
      collect() {
        const e = self.safe(() => self.source?.epoch());
        if (e !== undefined) this.set(e);
      },
    });
    new Gauge({
      name: 'bkv_table_entries',
      help: 'entries of the bounded in-memory tables: open sessions (of them enrolments), open channels, remembered closed channel ids, rate-limit buckets',
      labelNames: ['table'],
      registers: r,
      collect() {
        const t = self.safe(() => self.source?.tables?.());
        if (!t) return;
        for (const [table, n] of Object.entries(t)) this.set({ table }, n);
      },
    });
    // Cohort mode only; labelled with the node id so a dashboard tells the nodes apart.
    const cohortGauge = (name: string, help: string, pick: (c: NonNullable<ReturnType<NonNullable<MetricsSource['cohort']>>>) => number) =>
      new Gauge({
        name,
        help,
        labelNames: ['node'],
        registers: r,
        collect() {
          const c = self.safe(() => self.source?.cohort?.());
          if (c) this.set({ node: c.node }, pick(c));
        },
      });
    cohortGauge('bkv_cohort_applied_revision', 'etcd revision this node\'s replica has applied', (c) => c.applied);
    cohortGauge('bkv_cohort_lag_revisions', 'revisions etcd is known to hold that this node has not applied yet', (c) => c.lag);
    cohortGauge('bkv_cohort_txns', 'group-commit txns this node sent to etcd since start', (c) => c.txns);
    cohortGauge('bkv_cohort_compare_failed', 'txns that lost a compare (another node changed a record first) since start', (c) => c.compareFailed);
    cohortGauge('bkv_cohort_commits', 'record commits resolved through the quorum since start', (c) => c.commits);
    new Gauge({
      name: 'bkv_rpc_connections',
      help: 'open WebSocket connections',
      registers: r,
      collect() {
        const n = self.safe(() => self.source?.connections());
        if (n !== undefined) this.set(n);
      },
    });
  }

  attach(source: MetricsSource): void {
    this.source = source;
  }

  observeRequest(e: RequestEvent): void {
    this.requests.inc({ method: e.method, outcome: e.outcome });
    this.requestSeconds.observe({ method: e.method }, e.ms / 1000);
  }

  /** Count events from the vault's log stream (see daemon.ts: the log tap). */
  onLogEvent(event: string): void {
    switch (event) {
      case 'record.locked':
        this.lockouts.inc();
        break;
      case 'state.rollback':
      case 'state.mismatch':
      case 'state.anchor.foreign':
        this.rollbacks.inc();
        break;
      case 'state.anchor.failed':
        this.anchorFailures.inc();
        break;
      case 'auth.refused':
        this.authRefused.inc();
        break;
    }
  }

  /** Wrap the method table so the in-flight gauge tracks every request being served. */
  wrapMethods(methods: Record<string, Handler>): Record<string, Handler> {
    const out: Record<string, Handler> = {};
    for (const [name, h] of Object.entries(methods)) {
      out[name] = async (params, ctx, beforeWork) => {
        this.inFlight.inc();
        try {
          return await h(params, ctx, beforeWork);
        } finally {
          this.inFlight.dec();
        }
      };
    }
    return out;
  }

  async text(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  // A scrape must never fail because the database or HSM is briefly unhappy:
  // readiness reports that; metrics report what they can.
  private safe<T>(fn: () => T): T | undefined {
    try {
      return fn();
    } catch {
      return undefined;
    }
  }
}

/**
 * VaultKeys with every HSM call timed and its failures counted (op label: the
 * method's name in snake_case), and each ping's answer kept as bkv_hsm_up. It
 * changes no behaviour: results and errors pass through untouched.
 */
export function instrumentKeys(inner: VaultKeys, m: Metrics): VaultKeys {
  return decorateKeys(inner, async (op, call) => {
    if (op === 'close') return call();
    if (op === 'ping') {
      const up = (await call()) === true;
      m.hsmUp.set(up ? 1 : 0);
      return up;
    }
    const label = op.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
    const end = m.hsmSeconds.startTimer({ op: label });
    m.hsmInFlight.inc();
    try {
      return await call();
    } catch (e) {
      m.hsmErrors.inc({ op: label, code: isVaultError(e) ? e.code : 'INTERNAL' });
      throw e;
    } finally {
      m.hsmInFlight.dec();
      end();
    }
  });
}
