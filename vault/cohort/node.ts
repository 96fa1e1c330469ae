// A daemon's membership of a cohort (docs/COHORT.md): the etcd client, this
// node's SQLite replica and the replication engine, opened and checked at
// start, and what readiness, status and metrics read from them.
//
// Start refuses, with a clear message and its own exit code (main.ts), when no
// etcd quorum answers: a node configured for a cohort never falls back to
// serving alone, which would fork the attempt counters.
//
// The HSM anchor of the cohort state (docs/COHORT.md, "Rollback detection"):
// after each checkpoint write the node records `{ revision, head, checkpoint }`
// as a reserved row of its single-node ledger (core/ledger.ts), whose Merkle
// root the HSM anchors; at start it reads the row back and gives it to the
// engine as `anchor`. So the cohort state is anchored through the same HSM
// object as a single node's records, with the same protection: a restored
// older vault.db is refused by the ledger, and a wiped or old cohort.db is
// checked against etcd with the anchored revision, head and checkpoint.
import type { Logger } from 'pino';
import type { Etcd3 } from 'etcd3';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { SqliteReplica } from '../store/cohort-replica.js';
import { connectEtcd, validateEndpoints } from './etcd.js';
import { CohortLedger, type LedgerAnchor, type LedgerStatus } from './ledger.js';
import { ObservedReplica } from './replica.js';
import { CohortRecordLog } from '../core/record-log.js';
import { KEYRING_ID, type CohortKeyring } from './keyring.js';
import type { Ledger } from '../core/ledger.js';
import type { StoredRecord } from '../store/records.js';
import type { Tenant } from '../store/tenants.js';
import { CohortTenants } from './tenants.js';

/**
 * The ledger row holding this node's cohort anchor. A record key no user id can
 * produce (user ids hold no control character: core/input.ts); state "deleted", so
 * no flow serves it; the fields below carry the anchor.
 */
export const COHORT_ANCHOR_KEY = '\u0000cohort-anchor';

interface AnchorBody {
  revision: string;
  checkpoint?: { modRevision: string; digest: string };
}

function anchorRow(a: LedgerAnchor & { head: Uint8Array }, now: number): StoredRecord {
  const body: AnchorBody = {
    revision: a.revision.toString(),
    ...(a.checkpoint ? { checkpoint: { modRevision: a.checkpoint.modRevision.toString(), digest: a.checkpoint.digest } } : {}),
  };
  return {
    userId: COHORT_ANCHOR_KEY,
    state: 'deleted',
    generation: 1,
    attempts: 0,
    attemptLimit: 1,
    verifier: a.head,
    sealed: new Uint8Array(Buffer.from(JSON.stringify(body), 'utf8')),
    sealEpoch: null,
    kdf: null,
    createdAt: now,
    updatedAt: now,
  };
}

function anchorOf(rec: StoredRecord | undefined): LedgerAnchor | undefined {
  if (!rec || !rec.verifier || !rec.sealed) return undefined;
  const b = JSON.parse(Buffer.from(rec.sealed).toString('utf8')) as AnchorBody;
  return {
    revision: BigInt(b.revision),
    head: rec.verifier,
    ...(b.checkpoint ? { checkpoint: { modRevision: BigInt(b.checkpoint.modRevision), digest: b.checkpoint.digest } } : {}),
  };
}

export interface CohortSettings {
  endpoints: string[];
  prefix: string;
  nodeId: string;
  /** This node's replica file. */
  replicaPath: string;
  /** How long start waits for a quorum to answer. */
  startTimeoutMs?: number;
  /** TLS to etcd: its client CA, and this node's client certificate and key (PEM). */
  tls?: { ca: Buffer; cert?: Buffer; key?: Buffer };
  /** Each record commit's latency, in seconds (metrics). */
  onCommit?: (seconds: number) => void;
  /** This node's local tenants table (vault.db): copied into etcd at the cohort's first start (tenants.ts). */
  localTenants?: readonly Tenant[];
}

/** Exit code of `bkv-vault serve` when the cohort's etcd has no quorum at start. */
export const EXIT_NO_QUORUM = 3;

export interface CohortReport {
  nodeId: string;
  appliedRevision: string;
  seenRevision: string;
  lag: string;
  chainHead: string;
  clusterId: string | undefined;
  stopped: string | undefined;
  records: number;
  /** Tenant names in etcd (every version of one name is one value). */
  tenants: number;
  /** The cohort state last anchored in the HSM (through the ledger row), if any yet. */
  anchored: { revision: string; head: string; checkpointRevision?: string } | undefined;
  /** The cohort's seal epochs (keyring.ts): the current one, a rotation under way, the last one's stragglers. */
  keyring?: { current: number; retired: number; members: string[]; rotation: { target: number; phase: string; from: string; fenced: string[] } | null; last: { epoch: number; destroyedOn: string[]; pending: string[] } | null };
  stats: LedgerStatus['stats'];
}

export class CohortNode {
  /** The cohort's seal epochs (keyring.ts), set by the daemon once this node joined. */
  keyring: CohortKeyring | undefined;
  private anchorTimer: NodeJS.Timeout | undefined;
  private anchoring = false;
  private closed = false;

  private constructor(
    readonly settings: CohortSettings,
    readonly etcd: Etcd3,
    readonly replica: SqliteReplica,
    readonly ledger: CohortLedger,
    readonly records: CohortRecordLog,
    /** The cohort's tenants (etcd), read from this node's applied replica. */
    readonly tenants: CohortTenants,
    private readonly local: Ledger,
    private readonly log: Logger,
    private anchored: LedgerAnchor | undefined,
  ) {}

  static async start(s: CohortSettings, log: Logger, local: Ledger): Promise<CohortNode> {
    const endpoints = validateEndpoints(s.endpoints, 'cohort.endpoints');
    const timeoutMs = s.startTimeoutMs ?? 10_000;
    const etcd = connectEtcd(endpoints, { field: 'cohort.endpoints', ...(s.tls ? { tls: s.tls } : {}) });
    let replica: SqliteReplica | undefined;
    let ledger: CohortLedger | undefined;
    try {
      await quorum(etcd, endpoints.length, timeoutMs);
      replica = new SqliteReplica(s.replicaPath);
      const from = replica.appliedRevision;
      // Read through the ledger: a row that does not match the HSM-anchored root is refused there.
      const anchor = anchorOf(local.get(COHORT_ANCHOR_KEY));
      // The tenant table and the record port's index of records at their limit follow what the engine applies.
      const observed = new ObservedReplica(replica);
      const tenants = new CohortTenants(s.prefix, log);
      tenants.follow(observed);
      ledger = new CohortLedger({ etcd, replica: observed, prefix: s.prefix, nodeId: s.nodeId, checkpointMs: 1_000, ...(anchor ? { anchor } : {}) });
      const t0 = Date.now();
      await ledger.start();
      log.info(
        {
          event: 'cohort.start',
          node: s.nodeId,
          endpoints: endpoints.length,
          fromRevision: from.toString(),
          appliedRevision: replica.appliedRevision.toString(),
          rebuilt: from === 0n,
          anchoredRevision: anchor?.revision.toString() ?? null,
          records: replica.size,
          ms: Date.now() - t0,
        },
        from === 0n ? 'cohort replica built from an etcd snapshot' : 'cohort replica caught up from etcd',
      );
      tenants.attach(ledger);
      await tenants.migrate(s.localTenants ?? [], s.nodeId);
      const records = new CohortRecordLog(ledger, replica, s.onCommit);
      records.follow(observed);
      const node = new CohortNode(s, etcd, replica, ledger, records, tenants, local, log, anchor);
      await node.anchor();
      node.anchorTimer = setInterval(() => void node.anchor(), 1_000);
      node.anchorTimer.unref();
      return node;
    } catch (e) {
      await ledger?.close().catch(() => undefined);
      replica?.close();
      etcd.close();
      throw e;
    }
  }

  /**
   * Anchor `{ revision, head, checkpoint }` in the HSM once the engine wrote a new
   * checkpoint (docs/COHORT.md: the anchor is as fresh as its last write). A failure
   * (HSM down) is logged and retried at the next tick; the engine keeps serving.
   */
  async anchor(): Promise<void> {
    if (this.anchoring || this.closed || this.ledger.stopped) return;
    const st = this.ledger.status();
    const ck = st.checkpoint;
    if (!ck || (this.anchored?.checkpoint && this.anchored.checkpoint.modRevision >= ck.modRevision)) return;
    this.anchoring = true;
    try {
      const a = { revision: st.appliedRevision, head: new Uint8Array(Buffer.from(st.chainHead, 'hex')), checkpoint: ck };
      this.local.transaction(() => this.local.put(anchorRow(a, Date.now())));
      await this.local.sync();
      this.anchored = a;
    } catch (e) {
      this.log.warn({ event: 'cohort.anchor.failed', err: (e as Error).message }, 'could not anchor the cohort state in the HSM; retrying');
    } finally {
      this.anchoring = false;
    }
  }

  report(): CohortReport {
    const st = this.ledger.status();
    return {
      nodeId: st.nodeId,
      appliedRevision: st.appliedRevision.toString(),
      seenRevision: st.seenRevision.toString(),
      lag: st.lag.toString(),
      chainHead: st.chainHead,
      clusterId: st.clusterId,
      stopped: st.stopped,
      records: this.replica.keys(`${this.settings.prefix}/r/`).filter((k) => !this.tenants.owns(k) && !k.endsWith(KEYRING_ID)).length,
      tenants: this.tenants.list().reduce((names, t) => names.add(t.name), new Set<string>()).size,
      anchored: this.anchored
        ? {
            revision: this.anchored.revision.toString(),
            head: Buffer.from(this.anchored.head ?? new Uint8Array()).toString('hex'),
            ...(this.anchored.checkpoint ? { checkpointRevision: this.anchored.checkpoint.modRevision.toString() } : {}),
          }
        : undefined,
      ...(this.keyringReport() ? { keyring: this.keyringReport()! } : {}),
      stats: st.stats,
    };
  }

  private keyringReport(): CohortReport['keyring'] {
    let k;
    try {
      k = this.keyring?.peek();
    } catch {
      return undefined;
    }
    if (!k) return undefined;
    const r = k.rotation;
    return {
      current: k.current,
      retired: k.retired,
      members: Object.keys(k.members).sort(),
      rotation: r ? { target: r.target, phase: r.phase, from: r.from, fenced: r.fenced } : null,
      last: k.last ? { epoch: k.last.epoch, destroyedOn: k.last.destroyedOn, pending: k.last.pending } : null,
    };
  }

  /**
   * Ready when a quorum answers a linearizable request and this replica has
   * applied the revision it named within `timeoutMs`: a node behind etcd or cut
   * off from its quorum takes no traffic.
   */
  async readiness(timeoutMs = 1_500): Promise<{ ok: boolean; detail?: string; appliedRevision: string; lag: string }> {
    const base = () => {
      const st = this.ledger.status();
      return { appliedRevision: st.appliedRevision.toString(), lag: st.lag.toString() };
    };
    const stopped = this.ledger.stopped;
    if (stopped) return { ok: false, detail: stopped.message, ...base() };
    const keys = this.keyring?.health();
    if (keys) return { ok: false, detail: keys, ...base() };
    try {
      const rev = await withTimeout(this.ledger.readIndex(), timeoutMs, 'no etcd quorum answered');
      await this.ledger.waitApplied(rev, timeoutMs);
      return { ok: true, ...base() };
    } catch (e) {
      return { ok: false, detail: `cohort: ${(e as Error).message}`, ...base() };
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    this.keyring?.close();
    if (this.anchorTimer) clearInterval(this.anchorTimer);
    await this.ledger.close().catch(() => undefined);
    this.etcd.close();
    this.replica.close();
  }
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<T>((_, rej) => {
      timer = setTimeout(() => rej(new Error(`${what} within ${ms} ms`)), ms);
    }),
  ]);
}

/** A linearizable read needs a leader with a quorum behind it: retried until `timeoutMs`. */
async function quorum(etcd: Etcd3, members: number, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = '';
  while (Date.now() < deadline) {
    try {
      await withTimeout(etcd.get('bkv-quorum-probe').string(), Math.max(100, Math.min(2_000, deadline - Date.now())), 'no answer');
      return;
    } catch (e) {
      last = (e as Error).message;
      await new Promise((r) => setTimeout(r, 200));
    }
  }
  throw new VaultError(
    ErrorCodes.STORE_UNAVAILABLE,
    `cohort: no etcd quorum answered within ${timeoutMs} ms (${members} endpoint(s) configured; last error: ${last.slice(0, 200)}). ` +
      'A cohort node never serves alone: start a majority of the etcd members, or fix cohort.endpoints.',
    { cohort: 'no-quorum' },
  );
}
