#!/usr/bin/env node
// bkv-admin: the operator's command line. While the daemon runs it owns the
// HSM token (SoftHSM allows one writing process per token), so every command
// that needs the HSM goes through the daemon's admin listener; against a
// stopped vault the same commands open the token themselves, holding
// <data>/vault.lock so a daemon cannot start beside them.
import { Command, Option } from 'commander';
import { existsSync, mkdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join } from 'node:path';
import pino, { type Logger } from 'pino';
import { SOFTHSM_CANDIDATES, hsmSettings, loadConfig, type Config } from './config.js';
import { inspectModule, type CapabilityReport } from './hsm/capabilities.js';
import { VaultError, ErrorCodes, ADMIN_EXIT, errorSpec } from '../protocol/errors.js';
import { initVault, tokenConfig } from './setup.js';
import { openKeys, openVault } from './core/open.js';
import { Store } from './store/index.js';
import { openDb } from './store/db.js';
import { TenantStore, checkTenantName, type Tenant } from './store/tenants.js';
import { addTenant, hsmTenantSecret, mintTenantToken, revokeTenant, type TenantDeps } from './app/tenants.js';
import { rotate } from './app/rotate.js';
import { vaultIdOf } from '../protocol/descriptor.js';
import { logTap, openAudit } from './logging.js';
import { acquireLock } from './admin/lock.js';
import { offlineStatus, phaseLines, type StatusReport } from './admin/status.js';
import { AdminCallError, adminCall, adminStream, findDaemon, ping, type DaemonEndpoint } from './admin/client.js';
import { publicKeyFromText, verifyAudit } from './audit/chain.js';
import { isLoopback } from './admin/server.js';
import { dataPermissions } from './admin/perms.js';
import type { AuditLog } from './audit/log.js';
import type { VaultKeys } from './hsm/vault-keys.js';
import { registerCeremony } from './ceremony/cli.js';
import { isEntryPoint } from './entry.js';

// Everything an offline command creates (database, token, audit log) is for the vault's user only.
process.umask(0o077);

/** bkv-admin's exit codes (its --help); which code exits with which is the error table's (protocol/errors.ts). */
export const EXIT = ADMIN_EXIT;

class CliError extends Error {
  constructor(
    readonly exit: number,
    message: string,
  ) {
    super(message);
  }
}

interface Common {
  config?: string;
  data?: string;
}

const out = (s: string): void => void process.stdout.write(s.endsWith('\n') ? s : s + '\n');
const note = (s: string): void => void process.stderr.write(s.endsWith('\n') ? s : s + '\n');

function config(o: Common): Config {
  return loadConfig({ ...(o.config ? { file: o.config } : {}), overrides: { dataDir: o.data } });
}

/** Logger for offline commands: warnings to stderr, security events into the audit log. */
function offlineLogger(audit?: AuditLog): Logger {
  const streams: pino.StreamEntry[] = [{ level: 'warn', stream: pino.destination({ dest: 2, sync: true }) }];
  if (audit) streams.push({ level: 'info', stream: { write: logTap(undefined, audit) } });
  return pino({ level: 'info', base: { svc: 'bkv-admin' } }, pino.multistream(streams));
}

/**
 * Run `online` against the daemon when one runs, else `offline` with the data
 * lock held, the audit log open and a logger that feeds it.
 */
async function withVault<T>(
  c: Config,
  online: (ep: DaemonEndpoint) => Promise<T>,
  offline: (log: Logger, audit: AuditLog) => Promise<T>,
): Promise<T> {
  const ep = await findDaemon(c.dataDir);
  if (ep) return online(ep);
  if (!existsSync(c.dataDir)) throw new CliError(EXIT.NOT_FOUND, `no data folder at ${c.dataDir}: run "bkv-admin init" first`);
  const lock = acquireLock(c.dataDir, 'bkv-admin');
  let log: Logger | undefined;
  const audit = openAudit(c, undefined, () => log);
  log = offlineLogger(audit);
  try {
    return await offline(log, audit);
  } finally {
    await audit.close({ checkpoint: false });
    lock.release();
  }
}

/** What vault/app/tenants.ts needs, offline: vault.db's table, and secrets straight from the HSM (no daemon caches them). */
function offlineTenantDeps(c: Config, store: Store, log: Logger, keys: VaultKeys): TenantDeps {
  const vaultId = vaultIdOf(keys.signingPublic);
  return { tenants: store.tenants, secretFor: hsmTenantSecret(keys, vaultId), vaultId, tokenMaxLifetimeSec: c.limits.tokenMaxLifetimeSec, log };
}

/**
 * Offline, an unknown tenant has always been bkv-admin's own error (exit 5, no code in the
 * message); keep it so, whatever the shared operation throws for it.
 */
async function notFoundAsCli<T>(p: Promise<T>): Promise<T> {
  try {
    return await p;
  } catch (e) {
    if (e instanceof VaultError && e.code === ErrorCodes.RECORD_NOT_FOUND) throw new CliError(EXIT.NOT_FOUND, e.message);
    throw e;
  }
}

/** An offline command that had the HSM open leaves its audit lines signed, as the daemon does at shutdown. */
async function signAudit(audit: AuditLog, keys: VaultKeys): Promise<void> {
  audit.attachSigner({ vaultId: vaultIdOf(keys.signingPublic), sign: (d) => keys.sign(d) });
  await audit.checkpoint();
}

// ---- output helpers -------------------------------------------------------

function printStatus(s: StatusReport): void {
  const yes = (b: boolean) => (b ? 'yes' : 'NO');
  out(`vault ${s.vaultId ?? '(unknown)'}  (${s.mode === 'daemon' ? `daemon pid ${s.daemon?.pid}, up ${s.daemon?.uptimeSec} s, ${s.daemon?.connections} connections` : 'daemon not running'})`);
  out(`HSM      ${s.hsm.embedded ? 'embedded SoftHSM2' : 'external'} module ${s.hsm.module}, token "${s.hsm.tokenLabel}", answering: ${yes(s.hsm.up)}`);
  out(`keys     policy-conform: ${yes(s.policy.conform)}${s.policy.problem ? `\n         ${s.policy.problem}` : ''}`);
  if (s.policy.wrappable?.wrappable) {
    out(`wrap     keys can leave the HSM wrapped: YES${s.policy.wrappable.accepted ? ' (ACCEPTED by hsm.acceptWrappableKeys: the vault serves anyway)' : ' (the vault refuses to serve)'}`);
  }
  for (const k of s.policy.keys) out(`         ${k.label.padEnd(18)} ${k.purpose}`);
  if (s.policy.phase) out(phaseLines(s.policy));
  if (s.currentEpoch !== undefined) out(`epoch    ${s.currentEpoch} (seal keys present: ${s.policy.epochs.join(', ') || '?'})`);
  if (s.records) out(`records  ${s.records.active} active, ${s.records.locked} locked, ${s.records.deleted} deleted`);
  if (s.tenants) out(`tenants  ${s.tenants.active} active${s.tenants.names.length ? ` (${s.tenants.names.join(', ')})` : ''}, ${s.tenants.revoked} revoked`);
  if (s.anchor) out(`anchor   database batch ${s.anchor.dbSeq}, HSM anchor batch ${s.anchor.hsmSeq}, consistent: ${yes(s.anchor.consistent)}\n         ${s.anchor.detail}`);
  if (s.cohort) {
    const k = s.cohort;
    out(
      `cohort   node ${k.nodeId}, applied revision ${k.appliedRevision}, lag ${k.lag}, ${k.records} records, chain head ${k.chainHead.slice(0, 16)}…` +
        `${k.stopped ? `\n         STOPPED: ${k.stopped}` : ''}\n         HSM anchor of the cohort state: ${k.anchored ? `revision ${k.anchored.revision}, head ${k.anchored.head.slice(0, 16)}…` : 'none yet'}`,
    );
    const r = k.keyring;
    if (r) {
      out(
        `         seal epoch ${r.current} cohort-wide (nodes: ${r.members.join(', ')})` +
          (r.rotation ? `; rotation to ${r.rotation.target} under way (${r.rotation.phase}, by ${r.rotation.from}${r.rotation.fenced.length ? `, fenced: ${r.rotation.fenced.join(', ')}` : ''})` : '') +
          (r.last?.pending.length ? `; epoch ${r.last.epoch - 1} and older not yet destroyed on: ${r.last.pending.join(', ')}` : ''),
      );
    }
  }
  if (s.audit) out(`audit    ${s.audit.seq} lines, signed through ${s.audit.signedThrough}, writable: ${yes(s.audit.healthy)}`);
  if (s.permissions) out(`files    private (folders 0700, files 0600): ${yes(s.permissions.ok)}${s.permissions.problems.map((p) => `\n         ${p}`).join('')}`);
}

/** The capability table of `bkv-admin hsm check`. */
export function capabilityText(r: CapabilityReport, accepted: boolean): string {
  const lines: string[] = [];
  const m = r.module;
  lines.push(`module   ${m.path}: ${m.library} ${m.libraryVersion} (${m.manufacturer}), Cryptoki ${m.cryptoki}, library parameters ${m.libraryParameters ? 'set' : 'none'}`);
  lines.push(`token    "${r.token.label}": ${r.token.manufacturer} ${r.token.model}, firmware ${r.token.firmware}`);
  lines.push('');
  lines.push(`${'MECHANISM'.padEnd(28)} ${'NEEDED'.padEnd(9)} ${'KEY SIZES'.padEnd(14)} RESULT`);
  for (const x of r.mechanisms) {
    const sizes = x.present ? `${x.minKeySize}..${x.maxKeySize}` : '-';
    const result = !x.present ? `MISSING: ${x.problem}` : x.problem ? `PROBLEM: ${x.problem}` : `ok (${x.flags.map((f) => f.replace(/^CKF_/, '')).join(' ')})`;
    lines.push(`${x.name.padEnd(28)} ${(x.required ? 'required' : 'ceremony').padEnd(9)} ${sizes.padEnd(14)} ${result}`);
  }
  lines.push('');
  lines.push(`${'CHECK'.padEnd(22)} ${'RESULT'.padEnd(8)} ${'ANSWER'.padEnd(34)} DETAIL`);
  for (const c of r.checks) {
    const result = c.ok ? 'ok' : c.required ? 'FAILED' : 'handled';
    lines.push(`${c.name.padEnd(22)} ${result.padEnd(8)} ${c.answer.padEnd(34)} ${c.detail}`);
  }
  lines.push('');
  lines.push('WRAP: can keys that must never leave the token be wrapped out under a session key?');
  const rows = [...r.wrap.throwaway, ...r.wrap.vaultKeys];
  if (rows.length === 0) lines.push('  not tried: the module lists no AES wrapping mechanism');
  for (const w of rows) lines.push(`  ${w.key.padEnd(50)} ${w.wrapped ? `WRAPPED OUT (${w.mechanism})` : `refused (${w.answers.join('; ')})`}`);
  if (r.wrap.vaultKeys.length === 0) lines.push('  (no vault keys on the token yet: only throwaway keys were tried)');
  lines.push('');
  lines.push(`quirks   verifier compare: ${r.quirks.verify}, anchor: ${r.quirks.anchor === 'data' ? 'token data objects' : 'labels of two secret keys'}, key templates: ${r.quirks.template}`);
  const verdict = r.missing.length
    ? `NOT USABLE: missing ${r.missing.join('; ')}`
    : r.wrap.wrappable
      ? accepted
        ? 'usable, but keys can be wrapped out: served only because hsm.acceptWrappableKeys is set (not policy-conform)'
        : 'REFUSED: keys can be wrapped out of this token; set hsm.acceptWrappableKeys: true (BKV_HSM_ACCEPT_WRAPPABLE_KEYS=1) to serve anyway'
      : 'usable: every capability the vault needs is present';
  lines.push(`verdict  ${verdict}`);
  return lines.join('\n');
}

function printTenants(list: Tenant[]): void {
  if (list.length === 0) return out('no tenants');
  out('NAME                 VERSION  STATE    CREATED                   REVOKED                   NAMESPACE');
  for (const t of list) {
    out(
      `${t.name.padEnd(20)} ${String(t.version).padEnd(8)} ${t.state.padEnd(8)} ${new Date(t.createdAt).toISOString().padEnd(25)} ${(t.revokedAt ? new Date(t.revokedAt).toISOString() : '-').padEnd(25)} ${t.namespace}`,
    );
  }
}

function printSecret(r: { name: string; version: number; secret: string }): void {
  out(`tenant "${r.name}" credential version ${r.version} added.`);
  out('Tenant secret (shown only now; store it in the backend\'s secret store):');
  out(`  ${r.secret}`);
  note(
    `The backend mints HS256 JWTs with these 32 bytes (hex-decoded) as the key: header kid "${r.name}:${r.version}", ` +
      'claims aud = vault id, iat, exp (at most limits.tokenMaxLifetimeSec later). See docs/RPC.md. ' +
      '"bkv-admin tenant token NAME" mints one for testing.',
  );
}

// ---- commands --------------------------------------------------------------

const program = new Command('bkv-admin')
  .description('Operate a Backup Key Vault: keys, status, rotation, tenants, audit log, configuration')
  .showHelpAfterError()
  // commander's own usage errors (unknown option, missing argument) exit 2; --help 0. Inherited by subcommands.
  .exitOverride((err) => process.exit(err.exitCode === 0 ? 0 : EXIT.USAGE))
  .addHelpText(
    'after',
    `
While the daemon runs, commands that need the HSM go through its admin listener
(<data>/admin.json, authenticated by <data>/admin-token); against a stopped vault
they open the token themselves.

Exit codes:
  0 ok                               4 keys not policy-conform, or state inconsistent
  1 any other error                  5 not found (tenant, data folder)
  2 usage error or invalid config    6 daemon or HSM unavailable
  3 audit log verification failed    7 key ceremony step refused (CEREMONY_* code)

Environment: BKV_CONFIG, BKV_DATA and every BKV_* override of bkv-vault.`,
  );

function common(cmd: Command): Command {
  return cmd
    .option('-c, --config <file>', 'JSON or YAML config file (env BKV_CONFIG)')
    .option('-d, --data <dir>', 'data folder (env BKV_DATA)');
}

common(program.command('init'))
  .description('create the embedded token (if embedded), the key set of hsm-policy/, the database and vault-key.pub; idempotent')
  .action(async (o: Common) => {
    const c = config(o);
    const ep = await findDaemon(c.dataDir);
    if (ep) return out(`the vault is running (pid ${ep.pid ?? '?'}): it is initialised, nothing to do`);
    mkdirSync(c.dataDir, { recursive: true, mode: 0o700 });
    const lock = acquireLock(c.dataDir, 'bkv-admin init');
    let log: Logger | undefined;
    const audit = openAudit(c, undefined, () => log);
    log = offlineLogger(audit);
    try {
      const r = await initVault(c, log);
      log.info({ event: 'init', vaultId: r.vaultId, createdToken: r.createdToken, createdKeys: r.createdKeys }, 'vault initialised');
      out(`vault id       ${r.vaultId}`);
      out(`token          ${r.createdToken ? 'created (embedded SoftHSM2)' : 'existing'}`);
      out(`keys created   ${r.createdKeys.length ? r.createdKeys.join(', ') : 'none: every key of the policy is present and conform'}`);
      out(`public key     ${r.publicKeyFile}  (give this file to clients to pin)`);
    } finally {
      await audit.close({ checkpoint: false });
      lock.release();
    }
  });

common(program.command('status'))
  .description('keys present and policy-conform, record and tenant counts, anchor state, seal epoch')
  .option('--json', 'print JSON')
  .action(async (o: Common & { json?: boolean }) => {
    const c = config(o);
    const s = await withVault(
      c,
      (ep) => adminCall<StatusReport>(ep, 'GET', '/admin/status'),
      (log) => offlineStatus(c, log),
    );
    if (o.json) out(JSON.stringify(s, null, 2));
    else printStatus(s);
    if (!s.policy.conform || (s.anchor && !s.anchor.consistent)) process.exitCode = EXIT.NOT_CONFORM;
  });

common(program.command('rotate'))
  .description('new seal epoch: re-seal every live record, then destroy the older epoch keys in the HSM')
  .option('--resume', 'finish an interrupted rotation instead of starting a new one')
  .option('--batch-size <n>', 'records per anchored batch', (v) => Number(v))
  .option('--wait <sec>', 'cohort: how long to wait for the other nodes to import the new epoch and destroy the old (default 30)', (v) => Number(v))
  .action(async (o: Common & { resume?: boolean; batchSize?: number; wait?: number }) => {
    const c = config(o);
    const progress = (done: number, remaining: number) => note(`  re-sealed ${done}, remaining ${remaining}`);
    const show = (r: { epoch: number; resealed: number; unreadable: number; destroyedEpochs: number[]; destroyedOn?: string[]; pendingNodes?: string[] }) => {
      out(`seal epoch is now ${r.epoch}: ${r.resealed} records re-sealed, ${r.unreadable} unreadable (left to be shredded)`);
      out(`destroyed epoch keys: ${r.destroyedEpochs.length ? r.destroyedEpochs.join(', ') : 'none'}`);
      if (r.destroyedOn) out(`destroyed on nodes: ${r.destroyedOn.join(', ') || 'none'}`);
      if (r.pendingNodes?.length) {
        out(`NOT YET on nodes: ${r.pendingNodes.join(', ')} (down): each imports epoch ${r.epoch} and destroys the older keys at its next start, before it serves.`);
        out('Until then a database copy from before this rotation could still be opened on those HSMs.');
        process.exitCode = EXIT.FAILED;
        return;
      }
      out('Every database copy taken before this rotation can no longer be opened.');
    };
    const body = { resume: !!o.resume, ...(o.batchSize ? { batchSize: o.batchSize } : {}), ...(o.wait ? { waitSec: o.wait } : {}) };
    await withVault(
      c,
      async (ep) => {
        let failure: { code: string; message: string } | undefined;
        await adminStream(ep, '/admin/rotate', body, (l) => {
          if (l.progress) progress((l.progress as { done: number }).done, (l.progress as { remaining: number }).remaining);
          if (l.result) show(l.result as Parameters<typeof show>[0]);
          if (l.error) failure = l.error as typeof failure;
        });
        if (failure) throw new AdminCallError(failure.code, failure.message, 500);
      },
      async (log, audit) => {
        const vault = await openVault({
          hsm: tokenConfig(c),
          dbPath: c.dbPath ?? join(c.dataDir, 'vault.db'),
          log,
          vault: { attemptLimit: c.vault.attemptLimit, kdfFloor: { alg: 'argon2id', ...c.vault.kdfFloor } },
        });
        audit.attachSigner({ vaultId: vault.vaultId, sign: (d) => vault.keys.sign(d) });
        try {
          show(await rotate(vault, body, progress, false));
          await audit.checkpoint();
        } finally {
          vault.store.close();
          await vault.keys.close();
        }
      },
    );
  });

const hsm = program.command('hsm').description('the PKCS#11 module and token');

common(hsm.command('check'))
  .description(
    'load the module and report what it can do for the vault: the mechanisms the policy needs (key sizes, flags), ' +
      'where the state anchor can live, what a wrong HMAC gets from C_Verify, whether keys can be wrapped out, label writes',
  )
  .option('--json', 'print JSON')
  .action(async (o: Common & { json?: boolean }) => {
    const c = config(o);
    const accepted = hsmSettings(c).acceptWrappableKeys;
    const ep = existsSync(c.dataDir) ? await findDaemon(c.dataDir) : undefined;
    let r: CapabilityReport;
    if (ep) {
      // The daemon owns the token: show the check it ran at start rather than write probe objects under it.
      const s = await adminCall<StatusReport>(ep, 'GET', '/admin/status');
      if (!s.hsm.check) throw new CliError(EXIT.FAILED, 'the running daemon did not report a capability check');
      r = s.hsm.check;
      note(`(the check the running daemon, pid ${ep.pid ?? '?'}, made at start)`);
    } else {
      const lock = existsSync(c.dataDir) ? acquireLock(c.dataDir, 'bkv-admin hsm check') : undefined;
      try {
        r = inspectModule(tokenConfig(c), { vaultKeys: true });
      } finally {
        lock?.release();
      }
    }
    const serves = r.missing.length === 0 && (!r.wrap.wrappable || accepted);
    if (o.json) out(JSON.stringify({ ...r, verdict: { usable: r.missing.length === 0, wrappable: r.wrap.wrappable, accepted: r.wrap.wrappable && accepted, serves } }, null, 2));
    else out(capabilityText(r, accepted));
    if (!serves) process.exitCode = EXIT.NOT_CONFORM;
  });

/**
 * A cohort node's tenants live in etcd (docs/COHORT.md, "Tenants"); its vault.db table is only
 * what it brought in at its first cohort start. Changing that table offline would change
 * nothing any node serves, so it is refused: the daemon (up) writes through etcd.
 */
function refuseOfflineInCohort(c: Config, cmd: string): void {
  // The config may give `cohort` to the daemon only (BKV_COHORT_* in its environment, as
  // scripts/cohort does): a replica file in the data folder says the node is in one too.
  const replica = c.cohort?.replicaPath ?? join(c.dataDir, 'cohort.db');
  const why = c.cohort ? 'config "cohort"' : existsSync(replica) ? `its cohort replica ${replica} exists` : undefined;
  if (why) {
    throw new VaultError(
      ErrorCodes.BAD_REQUEST,
      `this node is in a cohort (${why}): its tenants live in etcd, not in ${c.dbPath ?? join(c.dataDir, 'vault.db')}. ` +
        `Start the daemon and run "bkv-admin ${cmd}" again: it goes through the daemon to etcd and reaches every node.` +
        (c.cohort ? '' : ` (A node that left its cohort for good: move ${replica} away.)`),
    );
  }
}

const tenant = program.command('tenant').description('backend credentials: add, list, revoke, mint a token');

common(tenant.command('add'))
  .argument('<name>', 'tenant name: 1-63 of a-z 0-9 _ . -')
  .description('add a tenant (or a new credential version of one) and print its secret once')
  .action(async (name: string, o: Common) => {
    checkTenantName(name);
    const c = config(o);
    const r = await withVault(
      c,
      (ep) => adminCall<{ name: string; version: number; secret: string }>(ep, 'POST', '/admin/tenants', { name }),
      async (log, audit) => {
        refuseOfflineInCohort(c, 'tenant add');
        const keys = openKeys(tokenConfig(c), false, log);
        const store = new Store(c.dbPath ?? join(c.dataDir, 'vault.db'));
        try {
          const r = await addTenant(offlineTenantDeps(c, store, log, keys), name);
          await signAudit(audit, keys);
          return r;
        } finally {
          store.close();
          await keys.close();
        }
      },
    );
    printSecret(r);
  });

common(tenant.command('list'))
  .description('list tenants and their credential versions')
  .option('--json', 'print JSON')
  .action(async (o: Common & { json?: boolean }) => {
    const c = config(o);
    const ep = await findDaemon(c.dataDir);
    let list: Tenant[];
    if (ep) list = (await adminCall<{ tenants: Tenant[] }>(ep, 'GET', '/admin/tenants')).tenants;
    else {
      const dbPath = c.dbPath ?? join(c.dataDir, 'vault.db');
      if (!existsSync(dbPath)) throw new CliError(EXIT.NOT_FOUND, `no database at ${dbPath}`);
      // Reading needs no HSM and no lock: the database is opened read-only.
      const db = openDb(dbPath, { readonly: true });
      try {
        list = new TenantStore(db).list();
      } finally {
        db.close();
      }
    }
    if (o.json) out(JSON.stringify(list, null, 2));
    else printTenants(list);
  });

common(tenant.command('revoke'))
  .argument('<name>', 'tenant name')
  .description('revoke every credential version of a tenant (or one, --version); its tokens stop working at once, open connections included')
  .option('--version <n>', 'revoke only this credential version; the others stay active', (v) => Number(v))
  .action(async (name: string, o: Common & { version?: number }) => {
    const version = o.version;
    if (version !== undefined && (!Number.isInteger(version) || version < 1)) throw new CliError(EXIT.USAGE, '--version must be a positive integer');
    const c = config(o);
    const r = await withVault(
      c,
      (ep) =>
        adminCall<{ name: string; revoked: number; connectionsClosed: number }>(ep, 'POST', '/admin/tenants/revoke', {
          name,
          ...(version !== undefined ? { version } : {}),
        }),
      async (log) => {
        refuseOfflineInCohort(c, 'tenant revoke');
        const store = new Store(c.dbPath ?? join(c.dataDir, 'vault.db'));
        try {
          // No daemon runs, so no connection is open: nothing to cut off.
          return await notFoundAsCli(revokeTenant({ tenants: store.tenants, log }, name, version));
        } finally {
          store.close();
        }
      },
    );
    out(`tenant "${r.name}": ${r.revoked} credential version(s) revoked, ${r.connectionsClosed} open connection(s) closed`);
  });

common(tenant.command('token'))
  .argument('<name>', 'tenant name')
  .description("mint a tenant JWT (HS256, newest active version) and print it: for tests and bootstrapping a backend")
  .option('--ttl <seconds>', 'lifetime in seconds', (v) => Number(v), 3600)
  .option('--sub <text>', 'free-text subject for the vault logs')
  .action(async (name: string, o: Common & { ttl: number; sub?: string }) => {
    if (!Number.isInteger(o.ttl) || o.ttl < 60) throw new CliError(EXIT.USAGE, '--ttl must be an integer number of seconds, at least 60');
    const c = config(o);
    if (o.ttl > c.limits.tokenMaxLifetimeSec) {
      throw new CliError(EXIT.USAGE, `--ttl over limits.tokenMaxLifetimeSec (${c.limits.tokenMaxLifetimeSec} s): the vault would refuse the token`);
    }
    const r = await withVault(
      c,
      (ep) => adminCall<{ token: string; version: number; expiresAt: string }>(ep, 'POST', '/admin/tenants/token', { name, ttlSec: o.ttl, ...(o.sub ? { sub: o.sub } : {}) }),
      async (log, audit) => {
        // The local table's newest version may be revoked (or superseded) in etcd.
        refuseOfflineInCohort(c, 'tenant token');
        const keys = openKeys(tokenConfig(c), false, log);
        const store = new Store(c.dbPath ?? join(c.dataDir, 'vault.db'));
        try {
          const r = await notFoundAsCli(mintTenantToken(offlineTenantDeps(c, store, log, keys), name, o.ttl, o.sub));
          await signAudit(audit, keys);
          return r;
        } finally {
          store.close();
          await keys.close();
        }
      },
    );
    out(r.token);
    note(`tenant "${name}" version ${r.version}, expires ${r.expiresAt}`);
  });

const audit = program.command('audit').description('the hash-chained, HSM-checkpointed audit log');

common(audit.command('verify'))
  .description('check the whole chain and every checkpoint signature offline, with the vault public key')
  .option('--file <file>', 'audit log (default: audit.file or <data>/audit.log)')
  .option('--key <file>', "the vault's public key, PEM or 130 hex digits (default <data>/vault-key.pub)")
  .option('--json', 'print the report as JSON')
  .action((o: Common & { file?: string; key?: string; json?: boolean }) => {
    let file = o.file;
    let keyFile = o.key;
    if (!file || !keyFile) {
      const c = config(o);
      file ??= c.audit.file ?? join(c.dataDir, 'audit.log');
      keyFile ??= join(c.dataDir, 'vault-key.pub');
    }
    if (!existsSync(file)) throw new CliError(EXIT.NOT_FOUND, `no audit log at ${file}`);
    if (!existsSync(keyFile)) throw new CliError(EXIT.NOT_FOUND, `no vault public key at ${keyFile}`);
    let key: Uint8Array;
    try {
      key = publicKeyFromText(readFileSync(keyFile, 'utf8'));
    } catch (e) {
      throw new CliError(EXIT.USAGE, `${keyFile} is not a P-256 public key: ${(e as Error).message}`);
    }
    const r = verifyAudit(readFileSync(file, 'utf8'), key);
    if (o.json) out(JSON.stringify(r, null, 2));
    else {
      out(`${file}: ${r.lines} lines, ${r.checkpoints} checkpoints${r.firstTime ? `, ${r.firstTime} .. ${r.lastTime}` : ''}`);
      out(`signed by the HSM through line ${r.signedThrough}; ${r.unsignedTail} later line(s) protected by the hash chain only`);
      for (const p of r.problems) out(`  line ${p.line}: ${p.message}`);
      out(r.ok ? 'OK: the chain is intact and every checkpoint signature verifies' : `FAILED: ${r.problems.length} problem(s)`);
    }
    if (!r.ok) process.exitCode = EXIT.AUDIT_BROKEN;
  });

common(audit.command('checkpoint'))
  .description('ask the running daemon to sign the current head of the audit log now')
  .action(async (o: Common) => {
    const c = config(o);
    const ep = await findDaemon(c.dataDir);
    if (!ep) throw new CliError(EXIT.UNAVAILABLE, 'the daemon is not running (it writes a checkpoint at every shutdown)');
    const r = await adminCall<{ checkpointed: boolean; seq: number; signedThrough: number }>(ep, 'POST', '/admin/audit/checkpoint');
    out(r.checkpointed ? `checkpoint written: signed through line ${r.signedThrough}` : `nothing new to sign (signed through ${r.signedThrough})`);
  });

export const BACKUP_DB_GUIDANCE = `Backing up the vault database — read this before you copy vault.db

A restored copy of vault.db is refused, on purpose.

Every change to a record (an attempt counted, a record destroyed, a password
reset) moves a Merkle root and a batch number that the vault anchors in the HSM
before it answers. At start the vault compares the database with that anchor:
  - database older than the anchor  -> STATE_ROLLBACK_DETECTED, the vault will not serve it
  - one batch ahead (a crash)       -> that unanswered batch is rolled back, nothing lost
  - same batch, different content   -> refused: rows were restored or altered
A single restored row is caught too: its bucket no longer hashes to the anchored state.
If a copy could be served, restoring it would hand back every wrong guess it
predates and bring destroyed records back to life: an attacker with disk access
could then guess passwords forever, 10 at a time.

What protects users instead:
  1. Durability on the live host: synchronous=FULL WAL on reliable storage (RAID /
     replicated block storage), so a power cut loses nothing acknowledged.
  2. The HSM is the root of trust: back up the HSM as its vendor prescribes
     (key-backup / cloning to a second HSM of the same security domain). With
     SoftHSM2 (development only) the token folder is the HSM.
  3. A database copy is still useful as forensic evidence and for statistics, never
     to serve: take it while the daemon is stopped, or with
        sqlite3 <data>/vault.db ".backup '/secure/place/vault-YYYYMMDD.db'"
     It is useless to an attacker without the HSM (records are sealed under HSM keys).
  4. Rotate ("bkv-admin rotate") after any suspected copy: the old seal epoch key
     is destroyed in the HSM and every older copy becomes unreadable for good.

If the live database is lost, users' password-protected keys are lost with it:
they restore with their 64-digit code, or start new backups. docs/OPERATIONS.md
("Disaster scenarios") lists what each failure costs users.`;

program
  .command('backup-db')
  .description('why a restored database is refused, and what to back up instead')
  .action(() => out(BACKUP_DB_GUIDANCE));

const configCmd = program.command('config').description('configuration file and environment');

interface ConfigProblem {
  field: string;
  message: string;
}

/** Checks beyond the schema: files that must exist, combinations the daemon refuses. */
export function configProblems(c: Config, env: NodeJS.ProcessEnv = process.env): { errors: ConfigProblem[]; warnings: ConfigProblem[] } {
  const errors: ConfigProblem[] = [];
  const warnings: ConfigProblem[] = [];
  const loopback = (h: string) => ['127.0.0.1', '::1', 'localhost'].includes(h);
  if (!c.tls && !loopback(c.listen.host)) errors.push({ field: 'listen.host', message: `${c.listen.host} is not loopback: plain ws:// is refused there; configure tls.certFile/tls.keyFile` });
  if (c.tls) {
    for (const k of ['certFile', 'keyFile'] as const) if (!existsSync(c.tls[k])) errors.push({ field: `tls.${k}`, message: `${c.tls[k]} does not exist` });
  }
  if (!isLoopback(c.admin.host)) warnings.push({ field: 'admin.host', message: `${c.admin.host} is not loopback: only /healthz, /readyz and /metrics are served there; bkv-admin needs a loopback listener` });
  if (c.admin.port !== 0 && c.admin.port === c.listen.port && c.admin.host === c.listen.host) errors.push({ field: 'admin.port', message: 'same address as listen' });
  if (c.hsm.module) {
    if (!existsSync(c.hsm.module)) errors.push({ field: 'hsm.module', message: `PKCS#11 module ${c.hsm.module} does not exist` });
    if (!c.hsm.pinFile && !env.BKV_HSM_PIN) errors.push({ field: 'hsm.pinFile', message: 'an external hsm.module needs hsm.pinFile (or BKV_HSM_PIN in the environment)' });
  } else if (!SOFTHSM_CANDIDATES.some((p) => existsSync(p))) {
    errors.push({ field: 'hsm.module', message: 'embedded mode needs SoftHSM2 (apt-get install softhsm2), or set hsm.module' });
  }
  if (c.hsm.pinFile) {
    if (!existsSync(c.hsm.pinFile)) errors.push({ field: 'hsm.pinFile', message: `${c.hsm.pinFile} does not exist` });
    else if ((statSync(c.hsm.pinFile).mode & 0o077) !== 0) warnings.push({ field: 'hsm.pinFile', message: `${c.hsm.pinFile} is readable by group or others; chmod 600` });
  }
  if (!existsSync(c.dataDir) && !existsSync(dirname(c.dataDir))) errors.push({ field: 'dataDir', message: `neither ${c.dataDir} nor its parent exists` });
  if (existsSync(c.dataDir)) {
    for (const p of dataPermissions(c.dataDir).problems) warnings.push({ field: 'dataDir', message: `${p}: readable or writable by group or others; chmod it` });
  }
  if (c.vault.kdfFloor.m < 19456) warnings.push({ field: 'vault.kdfFloor.m', message: `${c.vault.kdfFloor.m} KiB is below OWASP's Argon2id minimum (19456 KiB); fine for tests only` });
  return { errors, warnings };
}

common(configCmd.command('check'))
  .description('validate the config file plus BKV_* environment, printing every bad field')
  .option('--json', 'print the effective configuration as JSON when valid')
  .action((o: Common & { json?: boolean }) => {
    let c: Config;
    try {
      c = config(o);
    } catch (e) {
      throw new CliError(EXIT.USAGE, e instanceof VaultError ? e.message : String(e));
    }
    const { errors, warnings } = configProblems(c);
    for (const w of warnings) note(`warning: ${w.field}: ${w.message}`);
    if (errors.length) throw new CliError(EXIT.USAGE, `invalid configuration:\n${errors.map((e) => `  ${e.field}: ${e.message}`).join('\n')}`);
    if (o.json) out(JSON.stringify(c, null, 2));
    else {
      out(`configuration OK${o.config ?? process.env.BKV_CONFIG ? ` (${o.config ?? process.env.BKV_CONFIG})` : ' (defaults and environment)'}`);
      out(`  data      ${c.dataDir}`);
      out(`  listen    ${c.tls ? 'wss' : 'ws'}://${c.listen.host}:${c.listen.port}`);
      out(`  admin     http://${c.admin.host}:${c.admin.port}`);
      out(`  hsm       ${c.hsm.module ?? 'embedded SoftHSM2'} token "${c.hsm.tokenLabel}", PIN from ${process.env.BKV_HSM_PIN ? 'BKV_HSM_PIN' : (c.hsm.pinFile ?? join(c.dataDir, 'hsm-pin'))}${c.hsm.libraryParameters ? ', with library parameters' : ''}${c.hsm.acceptWrappableKeys ? ', wrappable keys ACCEPTED' : ''}`);
      out('            (not loaded: "bkv-admin hsm check" loads the module and tests what it can do)');
      out(`  audit     ${c.audit.file ?? join(c.dataDir, 'audit.log')} (checkpoint every ${c.audit.checkpointEvery} events or ${c.audit.checkpointSec} s)`);
    }
  });

common(program.command('health'))
  .description("the daemon's liveness (/healthz) or readiness (/readyz): exit 0 when fine (container HEALTHCHECK)")
  .option('--ready', 'check readiness (HSM, anchor, database, audit) instead of liveness')
  .addOption(new Option('--url <url>', 'admin listener URL (default: from <data>/admin.json)'))
  .action(async (o: Common & { ready?: boolean; url?: string }) => {
    let url = o.url;
    let token: string | undefined;
    if (!url) {
      const c = config(o);
      const info = join(c.dataDir, 'admin.json');
      if (!existsSync(info)) throw new CliError(EXIT.UNAVAILABLE, `the daemon is not running (no ${info})`);
      url = (JSON.parse(readFileSync(info, 'utf8')) as { url: string }).url;
      // With the admin token the check is never rate-limited: a flood of unauthenticated
      // requests on loopback cannot fail the container's HEALTHCHECK (docs/SECURITY.md F11).
      try {
        token = readFileSync(join(c.dataDir, 'admin-token'), 'utf8').trim();
      } catch {
        /* not readable by this user: ask like anyone else */
      }
    }
    let r: { status: number; body: unknown };
    try {
      r = await ping(url, o.ready ? '/readyz' : '/healthz', 5000, token);
    } catch (e) {
      throw new CliError(EXIT.UNAVAILABLE, `no answer from ${url}: ${(e as Error).message}`);
    }
    out(JSON.stringify(r.body));
    if (r.status !== 200) process.exitCode = EXIT.UNAVAILABLE;
  });

function exitCodeOf(e: unknown): number {
  if (e instanceof CliError) return e.exit;
  const code = e instanceof VaultError || e instanceof AdminCallError ? e.code : undefined;
  return (code !== undefined ? errorSpec(code)?.admin : undefined) ?? EXIT.FAILED;
}

registerCeremony(program);

/** The whole command tree, for tests that read its help without spawning a process per command. */
export { program as adminProgram };

/** Run bkv-admin on `argv` (the arguments after the program name); exits the process when done. */
export function runAdmin(argv: string[] = process.argv.slice(2)): Promise<void> {
  return program.parseAsync(argv, { from: 'user' }).then(
    () => undefined,
    (e: unknown) => {
      const code = e instanceof VaultError || e instanceof AdminCallError ? `${e.code}: ` : '';
      process.stderr.write(`bkv-admin: ${code}${(e as Error).message}\n`);
      process.exit(exitCodeOf(e));
    },
  );
}

// Run only as the program (bin/bkv-admin, node dist/vault/admin.js), never on import.
if (isEntryPoint(import.meta.url)) void runAdmin();
