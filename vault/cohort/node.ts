// A daemon's membership of a cohort (docs/COHORT.md): the etcd client, this
// node's SQLite replica and the replication engine, opened and checked at
// start, and what readiness, status and metrics read from them.
//
// Start refuses, with a clear message and its own exit code (main.ts), when no
// etcd quorum answers: a node configured for a cohort never falls back to
// serving alone, which would fork the attempt counters.
import type { Logger } from 'pino';
import type { Etcd3 } from 'etcd3';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { SqliteReplica } from '../store/cohort-replica.js';
import { connectEtcd, validateEndpoints } from './etcd.js';
import { CohortLedger, type LedgerStatus } from './ledger.js';
import { CohortRecordLog } from '../core/record-log.js';

export interface CohortSettings {
  endpoints: string[];
  prefix: string;
  nodeId: string;
  /** This node's replica file. */
  replicaPath: string;
  /** How long start waits for a quorum to answer. */
  startTimeoutMs?: number;
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
  /** What the HSM anchors of the cohort state (not yet: docs/COHORT.md "Left for wiring"). */
  anchored: false;
  stats: LedgerStatus['stats'];
}

export class CohortNode {
  private constructor(
    readonly settings: CohortSettings,
    readonly etcd: Etcd3,
    readonly replica: SqliteReplica,
    readonly ledger: CohortLedger,
    readonly records: CohortRecordLog,
  ) {}

  static async start(s: CohortSettings, log: Logger): Promise<CohortNode> {
    const endpoints = validateEndpoints(s.endpoints, 'cohort.endpoints');
    const timeoutMs = s.startTimeoutMs ?? 10_000;
    const etcd = connectEtcd(endpoints, { field: 'cohort.endpoints' });
    let replica: SqliteReplica | undefined;
    let ledger: CohortLedger | undefined;
    try {
      await quorum(etcd, endpoints.length, timeoutMs);
      replica = new SqliteReplica(s.replicaPath);
      const from = replica.appliedRevision;
      ledger = new CohortLedger({ etcd, replica, prefix: s.prefix, nodeId: s.nodeId, checkpointMs: 1_000 });
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
          records: replica.size,
          ms: Date.now() - t0,
        },
        from === 0n ? 'cohort replica built from an etcd snapshot' : 'cohort replica caught up from etcd',
      );
      return new CohortNode(s, etcd, replica, ledger, new CohortRecordLog(ledger, replica));
    } catch (e) {
      await ledger?.close().catch(() => undefined);
      replica?.close();
      etcd.close();
      throw e;
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
      records: this.replica.keys(`${this.settings.prefix}/r/`).length,
      anchored: false,
      stats: st.stats,
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
    try {
      const rev = await withTimeout(this.ledger.readIndex(), timeoutMs, 'no etcd quorum answered');
      await this.ledger.waitApplied(rev, timeoutMs);
      return { ok: true, ...base() };
    } catch (e) {
      return { ok: false, detail: `cohort: ${(e as Error).message}`, ...base() };
    }
  }

  async close(): Promise<void> {
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
