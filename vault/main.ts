#!/usr/bin/env node
// bkv-vault: the daemon's command line.
import { Command } from 'commander';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { loadConfig, parseListen } from './config.js';
import { devToken, makeLogger, startDaemon } from './daemon.js';
import { initVault } from './setup.js';
import { VaultError } from './errors.js';

const program = new Command('bkv-vault')
  .description('Backup Key Vault daemon: escrows backup keys behind passwords with an HSM-enforced guess limit')
  .showHelpAfterError();

program
  .command('serve')
  .description('serve the vault RPC over WebSocket until SIGTERM/SIGINT')
  .option('-c, --config <file>', 'JSON config file (env BKV_CONFIG)')
  .option('-d, --data <dir>', 'data folder: embedded token, database, public key (env BKV_DATA)')
  .option('-l, --listen <host:port>', 'listen address (env BKV_LISTEN), default 127.0.0.1:8787')
  .option('--init', 'create the embedded token, keys and database first when missing')
  .option('--dev', 'create a "dev" tenant and write a 24 h token to <data>/dev-token')
  .action(async (o: { config?: string; data?: string; listen?: string; init?: boolean; dev?: boolean }) => {
    const c = loadConfig({
      ...(o.config ? { file: o.config } : {}),
      overrides: { dataDir: o.data, listen: o.listen ? parseListen(o.listen) : undefined },
    });
    const log = makeLogger(c);
    if (o.init && !existsSync(join(c.dataDir, 'vault-key.pub'))) {
      const r = await initVault(c, log);
      log.info({ event: 'init', ...r }, 'vault initialised');
    }
    const d = await startDaemon(c, log);
    if (o.dev) {
      const token = await devToken(d, c, log);
      process.stderr.write(
        `\nDevelopment tenant token (valid 24 h, also in ${join(c.dataDir, 'dev-token')}):\n  BKV_TOKEN=${token}\n` +
          `Pinned vault key: ${join(c.dataDir, 'vault-key.pub')}\n\n`,
      );
    }
    let stopping = false;
    const stop = (sig: string) => {
      if (stopping) return;
      stopping = true;
      log.info({ event: 'signal', signal: sig }, 'draining');
      d.stop().then(
        () => process.exit(0),
        (e) => {
          log.error({ event: 'stop.failed', err: (e as Error).message }, 'unclean stop');
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
  process.exit(e instanceof VaultError && e.code === 'BAD_REQUEST' ? 2 : 1);
});
