#!/usr/bin/env node
// bkv-vault: the daemon's command line.
import { Command } from 'commander';
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { loadConfig, parseListen } from './config.js';
import { devToken, startAdmin, startDaemon, type Daemon } from './daemon.js';
import { logTap, makeLogger, openAudit } from './logging.js';
import { initVault } from './setup.js';
import { VaultError } from '../protocol/errors.js';
import { Metrics } from './metrics.js';
import { acquireLock, type DataLock } from './admin/lock.js';
import type { AuditLog } from './audit/log.js';
import type { RunningAdmin } from './admin/server.js';

// Before anything creates a file: everything this process creates is for its own user only
// (the database's -wal and -shm too, which SQLite creates with the database's mode). Explicit
// modes (0600, safe-file.ts) say the same where a file is made; this covers what others create
// for us (SQLite, SoftHSM's token files). docs/SECURITY.md F11.
process.umask(0o077);

const program = new Command('bkv-vault')
  .description('Backup Key Vault daemon: escrows backup keys behind passwords with an HSM-enforced guess limit')
  .showHelpAfterError();

program
  .command('serve')
  .description('serve the vault RPC over WebSocket until SIGTERM/SIGINT')
  .option('-c, --config <file>', 'JSON or YAML config file (env BKV_CONFIG)')
  .option('-d, --data <dir>', 'data folder: embedded token, database, public key (env BKV_DATA)')
  .option('-l, --listen <host:port>', 'listen address (env BKV_LISTEN), default 127.0.0.1:8787')
  .option('--admin-listen <host:port>', 'admin listener: health, metrics, bkv-admin (env BKV_ADMIN_LISTEN), default 127.0.0.1:8788')
  .option('--init', 'create the embedded token, keys and database first when missing')
  .option('--dev', 'create a "dev" tenant and write a 24 h token to <data>/dev-token')
  .action(async (o: { config?: string; data?: string; listen?: string; adminListen?: string; init?: boolean; dev?: boolean }) => {
    const c = loadConfig({
      ...(o.config ? { file: o.config } : {}),
      overrides: {
        dataDir: o.data,
        listen: o.listen ? parseListen(o.listen) : undefined,
        admin: o.adminListen ? parseListen(o.adminListen) : undefined,
      },
    });
    mkdirSync(c.dataDir, { recursive: true, mode: 0o700 });
    // One owner of the token per data folder; taken before anything touches it.
    const lock: DataLock = acquireLock(c.dataDir, 'bkv-vault serve');
    const metrics = new Metrics();
    let log: Logger | undefined;
    let audit: AuditLog | undefined;
    let d: Daemon | undefined;
    let admin: RunningAdmin | undefined;
    try {
      audit = openAudit(c, metrics, () => log);
      log = makeLogger(c, logTap(metrics, audit));
      if (o.init && !existsSync(join(c.dataDir, 'vault-key.pub'))) {
        const r = await initVault(c, log);
        log.info({ event: 'init', ...r }, 'vault initialised');
      }
      d = await startDaemon(c, log, { metrics, audit });
      admin = await startAdmin(d, c, log);
    } catch (e) {
      await admin?.close();
      await d?.stop();
      // Whatever was recorded (a detected rollback, say) is flushed; no checkpoint without a vault.
      await audit?.close({ checkpoint: false });
      lock.release();
      throw e;
    }
    const daemon = d;
    const logger = log;
    if (o.dev) {
      const token = await devToken(daemon, c, logger);
      process.stderr.write(
        `\nDevelopment tenant token (valid 24 h, also in ${join(c.dataDir, 'dev-token')}):\n  BKV_TOKEN=${token}\n` +
          `Pinned vault key: ${join(c.dataDir, 'vault-key.pub')}\n\n`,
      );
    }
    let stopping = false;
    const stop = (sig: string) => {
      if (stopping) return;
      stopping = true;
      logger.info({ event: 'signal', signal: sig }, 'draining');
      (async () => {
        await admin?.close();
        await daemon.stop();
        lock.release();
      })().then(
        () => process.exit(0),
        (e) => {
          logger.error({ event: 'stop.failed', err: (e as Error).message }, 'unclean stop');
          lock.release();
          process.exit(1);
        },
      );
    };
    process.on('SIGTERM', () => stop('SIGTERM'));
    process.on('SIGINT', () => stop('SIGINT'));
  });

program.parseAsync().catch((e: unknown) => {
  const msg = e instanceof VaultError ? `${e.code}: ${e.message}` : (e as Error).message;
  process.stderr.write(`bkv-vault: ${msg}\n`);
  // 3: a cohort node found no etcd quorum at start (cohort/node.ts); it never serves alone.
  process.exit(e instanceof VaultError && e.detail?.cohort === 'no-quorum' ? 3 : e instanceof VaultError && e.code === 'BAD_REQUEST' ? 2 : 1);
});
