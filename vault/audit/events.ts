// Which log events are security events, and which of their fields the audit
// log keeps. The vault core already logs every decision with a stable `event`
// name (and users only as the pseudonymous `user` ref), so the audit log is fed
// by tapping the log stream instead of threading an audit object through
// vault/core. The field lists are allow-lists: a field not named here never
// reaches the audit file, whatever a future log call passes.
import type { AuditFields, AuditValue } from './chain.js';

export const AUDITED: Readonly<Record<string, readonly string[]>> = {
  // records
  'enroll.finish': ['user', 'generation'],
  // Each recover.begin is a counted guess: an abandoned one has no finish line.
  'recover.begin': ['user', 'attemptsLeft'],
  'recover.finish': ['user', 'outcome', 'attemptsLeft'],
  'record.locked': ['user'],
  'record.delete': ['user'],
  'record.corrupt': ['user'],
  // keys and rotation
  'hsm.token.created': ['label'],
  'hsm.keys.created': ['labels'],
  init: ['vaultId', 'createdToken', 'createdKeys'],
  'rotate.start': ['epoch'],
  'rotate.done': ['epoch', 'resealed', 'unreadable', 'destroyedEpochs'],
  'rotate.unreadable': ['user'],
  // key ceremony (vault/ceremony/): fingerprints, labels and counts, never key material
  'ceremony.target-init': ['fingerprint', 'created'],
  'ceremony.trust': ['fingerprint', 'labels'],
  'ceremony.export': ['fingerprint', 'kind', 'labels', 'anchorSeq'],
  'ceremony.import': ['vaultId', 'fingerprint', 'kind', 'labels', 'anchorSeq', 'already'],
  'ceremony.seal': ['sealed', 'removed', 'phase'],
  'ceremony.reanchor': ['fromSeq', 'toSeq', 'already'],
  'ceremony.refused': ['step', 'code'],
  // tenants and operators
  'tenant.add': ['tenant', 'version'],
  'tenant.revoke': ['tenant', 'revoked'],
  'tenant.token': ['tenant', 'version', 'ttlSec'],
  'admin.denied': ['path'],
  // state integrity
  'state.rollback': ['dbSeq', 'anchorSeq', 'user', 'bucket'],
  'state.mismatch': ['anchorSeq'],
  'state.recovered': ['undone', 'fromSeq', 'toSeq'],
  'state.anchor.failed': ['seq'],
  // Another process wrote the HSM anchor: this vault stopped serving (hsm/anchor.ts).
  'state.anchor.foreign': ['seq', 'err'],
  // lifecycle
  'vault.start': ['vaultId', 'epoch', 'anchorSeq', 'pid', 'version'],
  stopped: [],
};

const EVENT = /"event":"([a-z][a-z0-9_.-]{0,63})"/;

function clean(v: unknown): AuditValue | undefined {
  if (v === null || typeof v === 'boolean') return v;
  if (typeof v === 'number') return Number.isFinite(v) ? v : undefined;
  if (typeof v === 'string') return v.slice(0, 200);
  if (Array.isArray(v)) {
    const out = v.slice(0, 64).map(clean).filter((x): x is string | number | boolean => x !== undefined && x !== null && !Array.isArray(x));
    return out;
  }
  return undefined;
}

/**
 * A pino JSON line → the audit event it carries, or undefined. Cheap for the
 * common case (request lines): a regex on the raw text before any JSON.parse.
 */
export function auditEventOf(line: string): { event: string; fields: AuditFields; time?: number } | undefined {
  const m = EVENT.exec(line);
  if (!m) return undefined;
  const keep = AUDITED[m[1]!];
  if (!keep) return undefined;
  let rec: Record<string, unknown>;
  try {
    rec = JSON.parse(line) as Record<string, unknown>;
  } catch {
    return undefined;
  }
  if (rec.event !== m[1]) return undefined;
  const fields: AuditFields = {};
  for (const k of keep) {
    const v = clean(rec[k]);
    if (v !== undefined) fields[k] = v;
  }
  return { event: m[1]!, fields, ...(typeof rec.time === 'number' ? { time: rec.time } : {}) };
}

/** The `event` name of any log line (for metrics), without parsing it. */
export function eventOf(line: string): string | undefined {
  return EVENT.exec(line)?.[1];
}
