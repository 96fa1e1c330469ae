// A real vault on a real SoftHSM2 token and a real SQLite file, with every log
// line captured so tests can search them for secrets.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { hsmOf, makeToken, type TestToken } from './softhsm.js';
import { openVault } from '../../vault/core/open.js';
import type { Vault, VaultOptions } from '../../vault/core/vault.js';
import type { KdfParams } from '../../protocol/kdf.js';

/** Small Argon2id parameters so tests spend their time on the vault, not the KDF. */
export const TEST_KDF: KdfParams = { alg: 'argon2id', m: 64, t: 1, p: 1 };

export interface TestVault {
  vault: Vault;
  token: TestToken;
  dbPath: string;
  dir: string;
  logs: string[];
  clock: { now: number };
  /** Stop the vault (database and HSM sessions closed), leaving its files for the test to edit. */
  stop(): void;
  /** Close and open again on the same token and database (a restart). */
  reopen(opts?: Partial<VaultOptions>): Promise<Vault>;
  close(): void;
}

export function captureLog(lines: string[]): pino.Logger {
  return pino({ level: 'debug' }, { write: (s: string) => void lines.push(s) });
}

export async function tempVault(opts: Partial<VaultOptions> = {}, token = makeToken()): Promise<TestVault> {
  const dir = mkdtempSync(join(tmpdir(), 'bkv-db-'));
  const dbPath = join(dir, 'vault.db');
  const logs: string[] = [];
  const clock = { now: Date.now() };
  const open = (o: Partial<VaultOptions>, create: boolean) =>
    openVault({
      hsm: hsmOf(token),
      dbPath,
      createKeys: create,
      log: captureLog(logs),
      vault: { kdfFloor: TEST_KDF, now: () => clock.now, ...o },
    });
  const t: TestVault = {
    vault: await open(opts, true),
    token,
    dbPath,
    dir,
    logs,
    clock,
    stop() {
      t.vault.close();
      t.vault.store.close();
      // Keys on this thread (no worker pool): the token's sessions close before this returns.
      void t.vault.keys.close();
    },
    async reopen(o = opts) {
      t.stop();
      t.vault = await open(o, false);
      return t.vault;
    },
    close() {
      t.stop();
      rmSync(dir, { recursive: true, force: true });
      token.cleanup();
    },
  };
  return t;
}
