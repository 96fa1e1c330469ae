// `bkv-admin status`: are the keys there and as strong as hsm-policy/ says,
// how many records and tenants, where the HSM anchor stands against the
// database, and the seal epoch. Computed by the daemon while it runs (it owns
// the token), or by bkv-admin itself against a stopped vault.
import { join } from 'node:path';
import { existsSync } from 'node:fs';
import type { Logger } from 'pino';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { Token, type TokenConfig } from '../hsm/token.js';
import { tokenKeys } from '../hsm/token-port.js';
import { enforcePolicy } from '../../hsm-policy/enforce.js';
import { ANCHOR, KEY_SET, PHASE_TEXT, sealLabel, type Phase } from '../../hsm-policy/policy.js';
import { ceremonyObjects, type CeremonyObjects } from '../ceremony/steps.js';
import { openDb } from '../store/db.js';
import { RecordStore } from '../store/records.js';
import { TenantStore, type Tenant, type TenantDirectory } from '../store/tenants.js';
import { vaultIdOf } from '../../protocol/descriptor.js';
import { toHex } from '../../protocol/bytes.js';
import type { Vault } from '../core/vault.js';
import type { AuditLog } from '../audit/log.js';
import type { CohortReport } from '../cohort/node.js';
import { hsmSettings, type Config } from '../config.js';
import { tokenConfig } from '../setup.js';
import { dataPermissions, type PermissionReport } from './perms.js';
import { inspectToken, knownQuirks, type CapabilityReport } from '../hsm/capabilities.js';

export interface PolicyReport {
  conform: boolean;
  /** Why not, when not (labels and attributes only). */
  problem?: string;
  keys: { name: string; label: string; purpose: string }[];
  epochs: number[];
  /** How the keys may leave the HSM (hsm-policy/policy.ts): not-cloneable, open, sealed, vendor-clone, or mixed. */
  phase?: Phase | 'mixed';
  keyPhases?: { label: string; phase: Phase; origin: string }[];
  /** The key ceremony's objects on the token: trusted targets, transport keys, a target's unwrap key. */
  ceremony?: CeremonyObjects;
  /**
   * The module let keys marked never-extractable out wrapped (capability check):
   * never policy-conform, whether or not the operator accepted it.
   */
  wrappable?: { wrappable: boolean; accepted: boolean; keys: string[] };
}

export interface StatusReport {
  mode: 'daemon' | 'offline';
  vaultId?: string;
  hsm: { module: string; tokenLabel: string; embedded: boolean; up: boolean; check?: CapabilityReport };
  policy: PolicyReport;
  currentEpoch?: number;
  records?: { active: number; locked: number; deleted: number };
  tenants?: { active: number; revoked: number; names: string[] };
  anchor?: { dbSeq: number; hsmSeq: number; consistent: boolean; lag: number; detail: string };
  audit?: { seq: number; signedThrough: number; healthy: boolean };
  daemon?: { pid: number; uptimeSec: number; connections: number };
  /** Cohort mode: this node's id (its role), applied revision, lag and engine figures. */
  cohort?: CohortReport;
  /** Folders looser than 0700, files looser than 0600 in the data folder (admin/perms.ts). */
  permissions?: PermissionReport;
}

/** Resolve the key set against hsm-policy/ without creating anything. */
export function checkPolicy(token: Token): PolicyReport & { resolved?: ReturnType<typeof enforcePolicy> } {
  const keys: PolicyReport['keys'] = KEY_SET.filter((k) => !k.perEpoch).map((k) => ({ name: k.name, label: k.label, purpose: k.purpose }));
  try {
    const resolved = enforcePolicy(token, { create: false });
    const epochs = [...resolved.seals.keys()].sort((a, b) => a - b);
    for (const e of epochs) keys.push({ name: 'seal', label: sealLabel(e), purpose: KEY_SET.find((k) => k.name === 'seal')!.purpose });
    keys.push({ name: 'anchor', label: ANCHOR.application, purpose: ANCHOR.purpose });
    return { conform: true, keys, epochs, phase: resolved.phase, keyPhases: resolved.phases, ceremony: ceremonyObjects(token), resolved };
  } catch (e) {
    if (e instanceof VaultError && e.code === ErrorCodes.HSM_POLICY_VIOLATION) return { conform: false, problem: e.message, keys, epochs: [] };
    throw e;
  }
}

/** A policy report that also says whether the module let keys out wrapped: such keys are never conform. */
export function withWrapResult(p: PolicyReport, check: CapabilityReport, accepted: boolean): PolicyReport {
  if (!check.wrap.wrappable) return { ...p, wrappable: { wrappable: false, accepted: false, keys: [] } };
  const keys = [...check.wrap.vaultKeys, ...check.wrap.throwaway].filter((w) => w.wrapped).map((w) => w.key);
  const why =
    `the HSM lets keys marked never-extractable out wrapped (${keys.join(', ')}): ` +
    (accepted ? 'served only because hsm.acceptWrappableKeys is set' : 'the vault refuses to serve them (hsm.acceptWrappableKeys is not set)');
  return { ...p, conform: false, problem: p.problem ? `${p.problem}; ${why}` : why, wrappable: { wrappable: true, accepted, keys } };
}

/** A second, read-only look at the token from inside the daemon (same process: no second owner). */
export function livePolicy(hsm: TokenConfig): PolicyReport {
  const token = Token.open(hsm);
  try {
    // The daemon measured them at start; a second measurement would write probe objects under the running vault.
    token.quirks = hsm.quirks ?? knownQuirks(hsm) ?? token.quirks;
    const { resolved: _r, ...report } = checkPolicy(token);
    return report;
  } finally {
    token.close();
  }
}

/** The status lines about the phase and the ceremony's objects. */
export function phaseLines(p: PolicyReport): string {
  const lines = [
    `phase    ${p.phase === 'mixed' ? 'mixed: some keys are open, others not (an interrupted seal? run "bkv-admin ceremony seal")' : PHASE_TEXT[p.phase!]}`,
  ];
  const c = p.ceremony;
  if (c?.trusted.length) lines.push(`         trusted ceremony targets: ${c.trusted.join(', ')}${c.transport.length ? ` (transport keys ready for: ${c.transport.join(', ')})` : ''}`);
  if (c?.unwrapKey) lines.push(`         ceremony unwrap key (this HSM is a clone target): ${c.unwrapKey}`);
  if (c?.otherTrusted.length) lines.push(`         other trusted objects, exits for open keys: ${c.otherTrusted.join(', ')}`);
  return lines.join('\n');
}

function tenantSummary(list: Tenant[]): StatusReport['tenants'] {
  const active = list.filter((t) => t.state === 'active');
  return { active: active.length, revoked: list.length - active.length, names: [...new Set(active.map((t) => t.name))] };
}

function anchorDetail(dbSeq: number, hsmSeq: number, rootsMatch: boolean): { consistent: boolean; detail: string } {
  if (dbSeq === hsmSeq && rootsMatch) return { consistent: true, detail: 'database and HSM anchor agree' };
  if (dbSeq === hsmSeq) return { consistent: false, detail: 'same batch, different state root: the database was altered; the vault refuses it' };
  if (dbSeq === hsmSeq + 1) return { consistent: true, detail: 'one committed batch was never anchored (a crash); the next start rolls it back, nothing acknowledged is lost' };
  if (dbSeq < hsmSeq) return { consistent: false, detail: `ROLLBACK: the database (batch ${dbSeq}) is older than the HSM anchor (batch ${hsmSeq}); the vault refuses it` };
  return { consistent: false, detail: `the database (batch ${dbSeq}) is ahead of the HSM anchor (batch ${hsmSeq}) by more than one batch: it belongs to another token` };
}

/** Status of the running vault, computed inside the daemon. */
export async function daemonStatus(
  c: Config,
  vault: Vault,
  extra: {
    audit?: AuditLog;
    startedAt: number;
    connections: () => number;
    hsmCheck?: CapabilityReport;
    cohort?: CohortReport;
    /** The tenants the daemon serves (a cohort node's come from etcd); default: vault.db's table. */
    tenants?: Pick<TenantDirectory, 'list'>;
  },
): Promise<StatusReport> {
  const s = hsmSettings(c);
  const up = await vault.keys.ping();
  let policy: PolicyReport;
  try {
    policy = up ? livePolicy(tokenConfig(c)) : { conform: false, problem: 'HSM unavailable: not checked', keys: [], epochs: vault.keys.epochs() };
  } catch (e) {
    policy = { conform: false, problem: `policy check failed: ${(e as Error).message}`, keys: [], epochs: vault.keys.epochs() };
  }
  if (extra.hsmCheck) policy = withWrapResult(policy, extra.hsmCheck, s.acceptWrappableKeys);
  const st = vault.ledger.status();
  let anchor: StatusReport['anchor'];
  try {
    // Through the ledger: another writer's label found here stops this vault too (hsm/anchor.ts).
    const a = await vault.ledger.readAnchor();
    const dbSeq = Number(vault.store.records.getMeta('state_seq') ?? '0');
    const rootsMatch = toHex(a.root) === (vault.store.records.getMeta('state_root') ?? toHex(a.root));
    const stopped = vault.ledger.status().stopped;
    anchor = {
      dbSeq,
      hsmSeq: a.seq,
      lag: Math.max(0, st.seq - st.anchored),
      ...(stopped ? { consistent: false, detail: stopped } : anchorDetail(dbSeq, a.seq, rootsMatch)),
    };
  } catch (e) {
    anchor = { dbSeq: st.seq, hsmSeq: -1, lag: st.seq - st.anchored, consistent: false, detail: `cannot read the HSM anchor: ${(e as Error).message}` };
  }
  return {
    mode: 'daemon',
    vaultId: toHex(vault.vaultId),
    hsm: { module: s.modulePath, tokenLabel: s.tokenLabel, embedded: !!s.embedded, up, ...(extra.hsmCheck ? { check: extra.hsmCheck } : {}) },
    policy,
    currentEpoch: vault.keys.currentEpoch(),
    records: vault.store.records.counts(),
    tenants: tenantSummary((extra.tenants ?? vault.store.tenants).list()),
    anchor,
    ...(extra.audit ? { audit: (({ seq, signedThrough, healthy }) => ({ seq, signedThrough, healthy }))(extra.audit.status()) } : {}),
    ...(extra.cohort ? { cohort: extra.cohort } : {}),
    daemon: { pid: process.pid, uptimeSec: Math.round((Date.now() - extra.startedAt) / 1000), connections: extra.connections() },
    permissions: dataPermissions(c.dataDir),
  };
}

/** Status of a stopped vault: opens the token (the caller holds the data lock) and the database read-only. */
export async function offlineStatus(c: Config, _log: Logger): Promise<StatusReport> {
  const s = hsmSettings(c);
  const report: StatusReport = {
    mode: 'offline',
    hsm: { module: s.modulePath, tokenLabel: s.tokenLabel, embedded: !!s.embedded, up: false },
    policy: { conform: false, problem: 'not checked', keys: [], epochs: [] },
    permissions: dataPermissions(c.dataDir),
  };
  const token = Token.open(tokenConfig(c));
  let hsmAnchor: { seq: number; root: string } | undefined;
  try {
    report.hsm.up = token.ping();
    const check = inspectToken(token, tokenConfig(c), { vaultKeys: true });
    token.quirks = check.quirks;
    const { resolved, ...policy } = checkPolicy(token);
    report.hsm.check = check;
    report.policy = withWrapResult(policy, check, s.acceptWrappableKeys);
    if (resolved) {
      report.vaultId = toHex(vaultIdOf(resolved.sig.point));
      report.currentEpoch = Math.max(...resolved.seals.keys());
      // A view over the resolved handles, only to read the anchor; closing the token below is enough.
      const a = await tokenKeys(token, resolved).readAnchor();
      hsmAnchor = { seq: a.seq, root: toHex(a.root) };
    }
  } finally {
    token.close();
  }
  const dbPath = c.dbPath ?? join(c.dataDir, 'vault.db');
  if (!existsSync(dbPath)) {
    if (hsmAnchor) report.anchor = { dbSeq: -1, hsmSeq: hsmAnchor.seq, lag: 0, consistent: false, detail: `no database at ${dbPath}` };
    return report;
  }
  const db = openDb(dbPath, { readonly: true });
  try {
    const records = new RecordStore(db);
    const tenants = new TenantStore(db);
    report.records = records.counts();
    report.tenants = tenantSummary(tenants.list());
    const dbSeq = Number(records.getMeta('state_seq') ?? '0');
    if (hsmAnchor) {
      const rootsMatch = (records.getMeta('state_root') ?? hsmAnchor.root) === hsmAnchor.root;
      report.anchor = { dbSeq, hsmSeq: hsmAnchor.seq, lag: Math.max(0, dbSeq - hsmAnchor.seq), ...anchorDetail(dbSeq, hsmAnchor.seq, rootsMatch) };
    }
    const bound = records.getMeta('vault_id');
    if (bound && report.vaultId && bound !== report.vaultId) {
      report.anchor = { dbSeq, hsmSeq: hsmAnchor?.seq ?? -1, lag: 0, consistent: false, detail: `the database belongs to vault ${bound}, not this token's vault` };
    }
  } finally {
    db.close();
  }
  return report;
}
