// `bkv-admin ceremony …`: the key ceremony as an operator flow, one step per
// command and host, files in between (bundle.ts), every step in the audit log.
//
//   on the new HSM   ceremony target-init                         → target file + fingerprint
//   on the source    ceremony trust --target F --fingerprint FP    (SO PIN; daemon stopped)
//   on the source    ceremony export --target F --out B [--epoch N] (through the daemon if it runs)
//   on the new HSM   ceremony import --bundle B --vault-id ID
//   on each HSM      ceremony seal
//
// Steps other than export need the token to themselves: they run against a
// stopped vault, holding <data>/vault.lock as other offline commands do.
import { Command } from 'commander';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import pino, { type Logger } from 'pino';
import { loadConfig, hsmSettings, readSoPin, type Config } from '../config.js';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { Token } from '../hsm/token.js';
import { enforcePolicy } from '../../hsm-policy/enforce.js';
import { PHASE_TEXT } from '../../hsm-policy/policy.js';
import { vaultIdOf } from '../../protocol/descriptor.js';
import { fromHex } from '../../protocol/bytes.js';
import { logTap, openAudit } from '../logging.js';
import { acquireLock } from '../admin/lock.js';
import { adminCall, findDaemon } from '../admin/client.js';
import { ensureEmbeddedToken, publicKeyPem, tokenConfig } from '../setup.js';
import { writeFileAtomic } from '../../lib/safe-file.js';
import type { AuditLog } from '../audit/log.js';
import { groupFingerprint, normalFingerprint, parseBundle, parseTarget } from './bundle.js';
import { exportBundle, importBundle, seal, targetInit, trust } from './steps.js';
import { reanchor } from './reanchor.js';

interface Common {
  config?: string;
  data?: string;
}

const out = (s: string): void => void process.stdout.write(s.endsWith('\n') ? s : s + '\n');

function config(o: Common): Config {
  return loadConfig({ ...(o.config ? { file: o.config } : {}), overrides: { dataDir: o.data } });
}

function common(cmd: Command): Command {
  return cmd.option('-c, --config <file>', 'JSON or YAML config file (env BKV_CONFIG)').option('-d, --data <dir>', 'data folder (env BKV_DATA)');
}

function readInput(file: string, what: string): string {
  if (!existsSync(file)) throw new VaultError(ErrorCodes.RECORD_NOT_FOUND, `no ${what} at ${file}`);
  return readFileSync(file, 'utf8');
}

/**
 * Run a step against a stopped vault: the data lock held, security events into
 * the audit log, a refusal recorded there too (with its code, nothing else).
 */
async function offline<T>(c: Config, step: string, fn: (log: Logger, audit: AuditLog) => Promise<T> | T, opts: { create?: boolean } = {}): Promise<T> {
  const ep = await findDaemon(c.dataDir);
  if (ep) {
    throw new VaultError(
      ErrorCodes.CEREMONY_DAEMON_RUNNING,
      `the daemon (pid ${ep.pid ?? '?'}) owns the HSM token: stop it for "ceremony ${step}"` +
        (step === 'trust' ? ' (the Security Officer cannot log in beside the daemon\'s user login, and SoftHSM allows one writing process per token)' : ''),
    );
  }
  if (!existsSync(c.dataDir)) {
    if (!opts.create) throw new VaultError(ErrorCodes.RECORD_NOT_FOUND, `no data folder at ${c.dataDir}`);
    mkdirSync(c.dataDir, { recursive: true, mode: 0o700 });
  }
  const lock = acquireLock(c.dataDir, `bkv-admin ceremony ${step}`);
  let log: Logger | undefined;
  const audit = openAudit(c, undefined, () => log);
  const streams: pino.StreamEntry[] = [
    { level: 'warn', stream: pino.destination({ dest: 2, sync: true }) },
    { level: 'info', stream: { write: logTap(undefined, audit) } },
  ];
  log = pino({ level: 'info', base: { svc: 'bkv-admin' } }, pino.multistream(streams));
  try {
    return await fn(log, audit);
  } catch (e) {
    if (e instanceof VaultError) log.info({ event: 'ceremony.refused', step, code: e.code }, `ceremony ${step} refused`);
    throw e;
  } finally {
    await audit.close({ checkpoint: false });
    lock.release();
  }
}

/** Leave the step's audit lines signed by this HSM's vault key, when it holds one. */
async function signAudit(audit: AuditLog, token: Token): Promise<void> {
  let r: ReturnType<typeof enforcePolicy>;
  try {
    r = enforcePolicy(token, { create: false });
  } catch {
    return; // a target before its import: no key to sign with, the hash chain carries the lines
  }
  audit.attachSigner({ vaultId: vaultIdOf(r.sig.point), sign: async (d) => token.ecdsaSign(r.sig.priv, d) });
  await audit.checkpoint();
}

async function withToken<T>(c: Config, fn: (token: Token) => Promise<T> | T): Promise<T> {
  const token = Token.open(tokenConfig(c));
  try {
    return await fn(token);
  } finally {
    token.close();
  }
}

export function registerCeremony(program: Command): void {
  const cer = program
    .command('ceremony')
    .description('clone the vault keys into another HSM without exposing them (PKCS#11 wrap under a key the SO trusts), then seal every copy')
    .addHelpText(
      'after',
      `
The flow (docs/OPERATIONS.md, "Key ceremony"); files travel between the hosts:
  new HSM   bkv-admin ceremony target-init                        -> target file, fingerprint
  source    bkv-admin ceremony trust --target F --fingerprint FP  (SO PIN, daemon stopped)
  source    bkv-admin ceremony export --target F --out B          (also through the daemon)
  new HSM   bkv-admin ceremony import --bundle B --vault-id ID
  each HSM  bkv-admin ceremony seal                               (nothing can leave afterwards)
After a rotation: export --epoch N on the rotated HSM, import on the others.
A clone kept as a standby replaces a dead HSM after "ceremony reanchor" (live database).
The SO PIN comes from hsm.soPinFile, BKV_HSM_SO_PIN_FILE or BKV_HSM_SO_PIN (embedded
token: <data>/hsm-so-pin), never from a flag.`,
    );

  common(cer.command('target-init'))
    .description('on the NEW HSM: generate its RSA-3072 unwrap key inside it, write the public key file, print the fingerprint')
    .option('--out <file>', 'where to write the target file (default <data>/ceremony-target.json)')
    .action(async (o: Common & { out?: string }) => {
      const c = config(o);
      const file = o.out ?? join(c.dataDir, 'ceremony-target.json');
      const r = await offline(
        c,
        'target-init',
        (log) => {
          ensureEmbeddedToken(c, log);
          return withToken(c, (token) => targetInit(token, log));
        },
        { create: true },
      );
      writeFileAtomic(file, JSON.stringify(r.target, null, 2) + '\n');
      out(`target key    bkv.ceremony.unwrap, RSA-3072, generated in this HSM, private half unwrap-only (${r.created ? 'created' : 'existing'})`);
      out(`target file   ${file}  (public: carry it to the source HSM's host)`);
      out(`fingerprint   ${groupFingerprint(r.target.fingerprint)}`);
      out('Read the fingerprint to the operators at the source over another channel; "ceremony trust" needs it.');
    });

  common(cer.command('trust'))
    .description('on the SOURCE, as Security Officer: make the target\'s public key a trusted wrapping key (daemon stopped)')
    .requiredOption('--target <file>', 'the target file written by target-init on the new HSM')
    .requiredOption('--fingerprint <hex>', 'the fingerprint target-init printed there, compared out of band')
    .action(async (o: Common & { target: string; fingerprint: string }) => {
      const c = config(o);
      const text = readInput(o.target, 'target file');
      const r = await offline(c, 'trust', async (log, audit) => {
        const target = parseTarget(text);
        if (normalFingerprint(o.fingerprint) !== target.fingerprint) {
          throw new VaultError(
            ErrorCodes.CEREMONY_FINGERPRINT_MISMATCH,
            `the target file's key has fingerprint ${groupFingerprint(target.fingerprint)}, not the one given (${o.fingerprint}): it is not the key the new HSM made; nothing was trusted`,
          );
        }
        // Before the token is touched: without the SO PIN nothing can happen, so nothing does.
        const soPin = readSoPin(hsmSettings(c));
        const res = { ...trust(tokenConfig(c), soPin, target, log), target };
        await withToken(c, (token) => signAudit(audit, token));
        return res;
      });
      out(`target ${groupFingerprint(r.target.fingerprint)} is trusted on this HSM`);
      out(`created       ${r.created.length ? r.created.join(', ') : 'nothing: already trusted'}`);
      out('Next, here: "bkv-admin ceremony export --target FILE --out BUNDLE" (the daemon may run again).');
    });

  common(cer.command('export'))
    .description('on the SOURCE: wrap every vault key (or one seal epoch) for a trusted target into a bundle file')
    .requiredOption('--target <file>', 'the target file of a target trusted here')
    .requiredOption('--out <file>', 'where to write the bundle')
    .option('--epoch <n>', 'export only this seal epoch (after a rotation)', (v) => Number(v))
    .action(async (o: Common & { target: string; out: string; epoch?: number }) => {
      if (o.epoch !== undefined && (!Number.isInteger(o.epoch) || o.epoch < 1)) throw new VaultError(ErrorCodes.BAD_REQUEST, '--epoch must be a seal epoch number (1, 2, …)');
      const c = config(o);
      const text = readInput(o.target, 'target file');
      const target = parseTarget(text);
      if (existsSync(o.out)) throw new VaultError(ErrorCodes.BAD_REQUEST, `${o.out} exists; name a new file for the bundle`);
      const ep = await findDaemon(c.dataDir);
      let r: { bundle: string; kind: string; labels: string[]; anchor: boolean };
      if (ep) {
        const res = await adminCall<{ bundle: string; kind: string; labels: string[] }>(ep, 'POST', '/admin/ceremony/export', {
          target: text,
          ...(o.epoch !== undefined ? { epoch: o.epoch } : {}),
        });
        r = { ...res, anchor: false };
      } else {
        r = await offline(c, 'export', (log, audit) =>
          withToken(c, async (token) => {
            const res = exportBundle(token, target, { ...(o.epoch !== undefined ? { epoch: o.epoch } : {}), includeAnchor: true }, log);
            await signAudit(audit, token);
            return { bundle: res.text, kind: res.bundle.kind, labels: res.labels, anchor: res.bundle.anchor !== null };
          }),
        );
      }
      writeFileAtomic(o.out, r.bundle);
      out(`bundle        ${o.out}  (${r.kind}: ${r.labels.join(', ')})`);
      out(`for target    ${groupFingerprint(target.fingerprint)}: it opens only inside that HSM`);
      if (r.kind === 'full') {
        out(
          r.anchor
            ? 'anchor        included (the daemon is stopped): a copy of vault.db taken now matches it'
            : 'anchor        not included (exported through the running daemon): the new HSM starts an empty state',
        );
      }
    });

  common(cer.command('import'))
    .description('on the NEW HSM: unwrap a bundle into keys of the policy\'s attributes and prove them with known answers')
    .requiredOption('--bundle <file>', 'the bundle written by export on the source')
    .option('--vault-id <hex>', 'the vault id the bundle must belong to (from "bkv-admin status" on the source); required for a full import')
    .option('--fresh-anchor', 'start the state anchor empty (a new, empty database) instead of where the source\'s stood')
    .action(async (o: Common & { bundle: string; vaultId?: string; freshAnchor?: boolean }) => {
      if (o.vaultId !== undefined && !/^[0-9a-fA-F]{32}$/.test(o.vaultId)) throw new VaultError(ErrorCodes.BAD_REQUEST, '--vault-id must be the 32 hex digits "bkv-admin status" shows');
      const c = config(o);
      const text = readInput(o.bundle, 'bundle');
      const r = await offline(c, 'import', (log, audit) =>
        withToken(c, async (token) => {
          const res = importBundle(token, parseBundle(text), { ...(o.vaultId ? { expectVaultId: o.vaultId } : {}), freshAnchor: !!o.freshAnchor }, log);
          await signAudit(audit, token);
          return res;
        }),
      );
      if (r.kind === 'full') writeFileAtomic(join(c.dataDir, 'vault-key.pub'), publicKeyPem(fromHex(r.sigPoint)));
      out(`vault id      ${r.vaultId}`);
      out(`imported      ${r.labels.join(', ')}${r.already ? ' (already here: the known answers match)' : ''}`);
      out('self-test     every key computes what the source\'s key computes (ECDH, HMAC, AES-GCM, ECDSA against the pinned key)');
      if (r.anchor) {
        out(
          r.anchor.fromSource
            ? `anchor        batch ${r.anchor.seq}, as the source's stood at export: start this vault on the copy of the source's vault.db taken with the export`
            : 'anchor        empty: start this vault on an empty database',
        );
        out(`public key    ${join(c.dataDir, 'vault-key.pub')} (the same key clients already pin)`);
      }
    });

  common(cer.command('reanchor'))
    .description(
      'on a REPLACEMENT HSM (a clone made earlier): move its state anchor forward to the live database; the witnesses vouch that it is the live one (daemon stopped)',
    )
    .action(async (o: Common) => {
      const c = config(o);
      const dbPath = c.dbPath ?? join(c.dataDir, 'vault.db');
      if (!existsSync(dbPath)) throw new VaultError(ErrorCodes.RECORD_NOT_FOUND, `no database at ${dbPath}`);
      const r = await offline(c, 'reanchor', (log, audit) =>
        withToken(c, async (token) => {
          const res = reanchor(token, dbPath, log);
          await signAudit(audit, token);
          return res;
        }),
      );
      out(r.already ? `anchor        already at the database's batch ${r.toSeq}: nothing to do` : `anchor        moved from batch ${r.fromSeq} to the database's batch ${r.toSeq}`);
      out('Start the daemon; "bkv-admin status" must show consistent: yes.');
    });

  common(cer.command('seal'))
    .description('on EACH HSM after the ceremony: make every key non-extractable for good and remove the ceremony\'s keys (daemon stopped)')
    .action(async (o: Common) => {
      const c = config(o);
      const r = await offline(c, 'seal', (log, audit) =>
        withToken(c, async (token) => {
          const res = seal(token, log);
          await signAudit(audit, token);
          return res;
        }),
      );
      out(`sealed        ${r.sealed.length ? r.sealed.join(', ') : 'nothing: no key was open'}`);
      out(`removed       ${r.removed.length ? r.removed.join(', ') : 'no ceremony objects'}`);
      out(`phase         ${r.phase === 'mixed' ? 'mixed' : PHASE_TEXT[r.phase]}`);
      if (r.otherTrusted.length) out(`note          other trusted objects on this token, not the vault's: ${r.otherTrusted.join(', ')}`);
    });
}
