// Bulk-load synthetic records for the scale test, through the vault's own
// APIs on a stopped vault's data folder: the HSM computes each verifier
// (HMAC) and sealed envelope (AES-GCM) exactly as enroll.finish does, and
// Ledger.put writes them with their bucket hashes and undo entries, in
// transactions of `chunk` records, each anchored in the HSM. Skipped: the
// OPRF evaluation and channel of enroll.begin, which leave nothing in the
// database. Every loaded user can be recovered by the load generator.
//
//   node dist/bench/bulk.js '{"dataDir":"...","from":10000,"to":1000000}'
import { join } from 'node:path';
import pino from 'pino';
import Database from 'better-sqlite3';
import { loadConfig } from '../vault/config.js';
import { tokenConfig } from '../vault/setup.js';
import { openVault } from '../vault/core/open.js';
import { verifierInput, sealAad } from '../protocol/record.js';
import { fromB64 } from '../protocol/bytes.js';
import type { StoredRecord } from '../vault/store/records.js';
import { syntheticUser } from './lib/vault-client.js';
import { emit } from './lib/proc.js';
import { BENCH_KDF } from './lib/config.js';
import { acquireLock } from '../vault/admin/lock.js';

async function main(): Promise<void> {
  const spec = JSON.parse(process.argv[2]!) as { dataDir: string; from: number; to: number; chunk?: number };
  const c = loadConfig({ env: {}, overrides: { dataDir: spec.dataDir } });
  const dbPath = c.dbPath ?? join(c.dataDir, 'vault.db');
  const log = pino({ level: 'warn' });
  const lock = acquireLock(c.dataDir, 'bench bulk load');
  const vault = await openVault({ hsm: tokenConfig(c), dbPath, log, hsmWorkers: { recycleAfter: 0 } });
  const keys = vault.keys;
  const epoch = keys.currentEpoch();
  const kdf = BENCH_KDF;
  const chunk = spec.chunk ?? 2000;
  const t0 = performance.now();
  let hsmMs = 0;
  let dbMs = 0;
  for (let at = spec.from; at < spec.to; at += chunk) {
    const ids = Array.from({ length: Math.min(chunk, spec.to - at) }, (_, k) => at + k);
    const h0 = performance.now();
    const recs: StoredRecord[] = await Promise.all(
      ids.map(async (i) => {
        const u = syntheticUser(i);
        const verifier = await keys.makeVerifier(verifierInput(vault.vaultId, u.userId, 1, fromB64(u.authKey)!));
        const sealed = await keys.seal(epoch, sealAad(vault.vaultId, u.userId, 1, epoch, verifier), u.envelope);
        const now = Date.now();
        return { userId: u.userId, state: 'active', generation: 1, attempts: 0, attemptLimit: vault.options.attemptLimit, verifier, sealed, sealEpoch: epoch, kdf, createdAt: now, updatedAt: now };
      }),
    );
    const d0 = performance.now();
    hsmMs += d0 - h0;
    vault.ledger.transaction(() => {
      for (const r of recs) vault.ledger.put(r);
    });
    await vault.ledger.sync();
    dbMs += performance.now() - d0;
    emit({ progress: at + ids.length - spec.from, t: Math.round(performance.now() - t0) });
  }
  vault.close();
  vault.store.close();
  await keys.close();
  // Fold the WAL into the file so its size is the database's.
  const db = new Database(dbPath);
  db.pragma('wal_checkpoint(TRUNCATE)');
  db.close();
  lock.release();
  const seconds = (performance.now() - t0) / 1000;
  emit({ result: { loaded: spec.to - spec.from, seconds: Math.round(seconds), perSec: Math.round((spec.to - spec.from) / seconds), hsmSec: Math.round(hsmMs / 1000), dbSec: Math.round(dbMs / 1000) } });
  setImmediate(() => process.exit(0));
}

main().catch((e: unknown) => {
  emit({ error: (e as Error).message, fatal: true });
  process.exit(1);
});
