// Readiness of a serving vault: may a load balancer send it traffic? Each check
// answers a question a recovery depends on, and says which one failed:
//   hsm    — the token answers (a recovery needs the OPRF key and the verifier key)
//   anchor — the HSM anchor holds exactly the state this process last anchored,
//            no other process wrote it, and every committed change is anchored
//            (retries a failed anchor write).
//            The anchor is a private token object, so reading it also proves the
//            session is logged in, not merely open.
//   db     — a real write commits (readers alone cannot count a guess)
//   audit  — security events are being recorded
// Liveness (/healthz) is only "the event loop answers": a vault that lost its
// HSM should be taken out of rotation, not restarted in a loop (a restart
// cannot bring back an HSM, and real HSMs lock after repeated bad logins).
import type { Vault } from '../core/vault.js';
import type { AuditLog } from '../audit/log.js';
import { toHex } from '../../protocol/bytes.js';
import type { CohortNode } from '../cohort/node.js';

export interface Check {
  ok: boolean;
  detail?: string;
}

export interface Readiness {
  ready: boolean;
  checks: {
    hsm: Check;
    anchor: Check & { seq?: number; anchored?: number; hsmSeq?: number; lag?: number };
    db: Check;
    audit?: Check;
    /** Cohort mode: a quorum answers and this node has applied etcd's current revision. */
    cohort?: Check & { node: string; appliedRevision: string; lag: string };
  };
}

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<T>((_, rej) => {
      timer = setTimeout(() => rej(new Error(`${what} timed out after ${ms} ms`)), ms);
    }),
  ]);
}

export async function readiness(vault: Vault, audit?: AuditLog, opts: { timeoutMs?: number; cohort?: CohortNode } = {}): Promise<Readiness> {
  const timeoutMs = opts.timeoutMs ?? 2000;
  let hsm: Check;
  try {
    hsm = (await vault.keys.ping()) ? { ok: true } : { ok: false, detail: 'the HSM token does not answer (session lost or device gone)' };
  } catch (e) {
    hsm = { ok: false, detail: `HSM ping failed: ${(e as Error).message}` };
  }

  let anchor: Readiness['checks']['anchor'];
  const stopped = vault.ledger.status().stopped;
  if (stopped) {
    // Another writer moved the anchor: this vault stopped serving, and nothing here brings it back.
    anchor = { ok: false, detail: stopped };
  } else if (!hsm.ok) {
    anchor = { ok: false, detail: 'not checked: the HSM is unavailable' };
  } else {
    try {
      // Resolves at once when idle; otherwise waits for (or retries) the anchor write.
      await withTimeout(vault.ledger.sync(), timeoutMs, 'anchoring committed changes');
      anchor = { ok: false };
      // A flush may land between our read of the HSM and of the ledger: look twice before calling it a mismatch.
      for (let i = 0; i < 3; i++) {
        // Through the ledger: a slot another process wrote stops it (hsm/anchor.ts).
        const a = await withTimeout(vault.ledger.readAnchor(), timeoutMs, 'reading the HSM anchor');
        const st = vault.ledger.status();
        if (st.stopped) {
          anchor = { ok: false, seq: st.seq, anchored: st.anchored, hsmSeq: a.seq, detail: st.stopped };
          break;
        }
        const lag = Math.max(0, st.seq - st.anchored);
        const same = a.seq === st.anchored && (st.seq !== st.anchored || toHex(a.root) === st.root);
        anchor = same
          ? { ok: true, seq: st.seq, anchored: st.anchored, hsmSeq: a.seq, lag }
          : {
              ok: false,
              seq: st.seq,
              anchored: st.anchored,
              hsmSeq: a.seq,
              lag,
              detail: 'the HSM anchor does not hold the state this vault anchored: another process wrote it, or the token was swapped',
            };
        if (same) break;
        await new Promise((r) => setTimeout(r, 20));
      }
    } catch (e) {
      const st = vault.ledger.status();
      anchor = { ok: false, seq: st.seq, anchored: st.anchored, lag: st.seq - st.anchored, detail: st.stopped ?? `anchor: ${(e as Error).message}` };
    }
  }

  let db: Check;
  try {
    // A real committed write: BEGIN IMMEDIATE alone succeeds on a file that can no longer be written.
    vault.store.records.setMeta('ready_probe', String(Date.now()));
    db = { ok: true };
  } catch (e) {
    db = { ok: false, detail: `database not writable: ${(e as Error).message}` };
  }
  // After a real write failed (disk full, I/O error), a one-page probe may still fit where
  // every real batch fails: ask for a batch-sized write before calling the store ready.
  const failure = vault.store.records.writeFailure;
  if (db.ok && failure) {
    try {
      vault.store.records.setMeta('ready_probe', 'x'.repeat(64 * 1024));
      vault.store.records.setMeta('ready_probe', String(Date.now()));
      vault.store.records.writeFailure = undefined;
    } catch (e) {
      db = { ok: false, detail: `database not writable (${failure} on the last write): ${(e as Error).message}` };
    }
  }
  // Writable is not enough: a damaged page makes some records unreadable (SQLITE_CORRUPT).
  if (db.ok && vault.store.records.corruptionSeen) {
    db = { ok: false, detail: 'the database file is damaged (SQLite reported corruption): restore it from the last good copy' };
  }

  const checks: Readiness['checks'] = { hsm, anchor, db };
  if (audit) {
    const s = audit.status();
    checks.audit = s.healthy ? { ok: true } : { ok: false, detail: 'the audit log cannot be written' };
  }
  if (opts.cohort) checks.cohort = { node: opts.cohort.settings.nodeId, ...(await opts.cohort.readiness(Math.min(timeoutMs, 1_500))) };
  return { ready: Object.values(checks).every((c) => c.ok), checks };
}

/**
 * Readiness for the unauthenticated /readyz. A flood of it used to run every check per
 * call, a database write and an HSM read each (docs/SECURITY.md F11). Now: concurrent
 * callers share one evaluation, and a result is served again for up to `ttlMs` — unless
 * one of the cheap signals (`signals()`: an HSM ping, a failed write,
 * corruption, the audit log, a stopped ledger) changed since, which evaluates at once.
 * So the write probe runs at most once per `ttlMs` however many ask.
 */
export function cachedReadiness(
  evaluate: () => Promise<Readiness>,
  signals: () => string | Promise<string>,
  opts: { ttlMs?: number; now?: () => number; onEvaluate?: () => void } = {},
): () => Promise<Readiness> {
  const ttlMs = opts.ttlMs ?? 1000;
  const now = opts.now ?? Date.now;
  let last: { at: number; signals: string; result: Readiness } | undefined;
  let running: Promise<Readiness> | undefined;
  // Callers that arrive while the signals are read or an evaluation runs share it.
  return () =>
    (running ??= (async () => {
      try {
        const s = await signals();
        if (last && now() - last.at < ttlMs && last.signals === s) return last.result;
        opts.onEvaluate?.();
        const result = await evaluate();
        // The signals as they stand after the evaluation (it may have retried an anchor write).
        last = { at: now(), signals: await signals(), result };
        return result;
      } finally {
        running = undefined;
      }
    })());
}

/** The cheap signals readiness depends on: one HSM ping round trip, the rest read without I/O (see cachedReadiness). */
export async function readinessSignals(vault: Vault, audit?: AuditLog): Promise<string> {
  let hsm: boolean;
  try {
    hsm = await vault.keys.ping();
  } catch {
    hsm = false;
  }
  // Not the anchor lag: it flickers with every batch in flight; a stuck anchor shows within ttlMs.
  const r = vault.store.records;
  return [hsm, vault.ledger.status().stopped ?? '', r.writeFailure ?? '', r.corruptionSeen, audit?.status().healthy ?? true].join('|');
}
