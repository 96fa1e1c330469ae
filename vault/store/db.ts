// Opens the SQLite file the vault keeps its sealed records in. WAL for
// concurrent readers, synchronous=FULL because an acknowledged attempt must
// survive a power cut (record batches commit NORMAL and fsync the log
// themselves: records.ts), secure_delete so a destroyed record's bytes are
// overwritten rather than left in free pages.
import Database from 'better-sqlite3';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { leafHashV4, type RowV3 } from './migration-4.js';
import { createIfMissing, lexists } from '../../lib/safe-file.js';
import { lstatSync } from 'node:fs';

export type Db = Database.Database;

// Each migration runs once, in order, inside a transaction; user_version
// records how far a file has come. Never edit a shipped migration: add one.
// A migration is SQL, or code for what SQL cannot compute (hashes).
const MIGRATIONS: (string | ((db: Db) => void))[] = [
  `CREATE TABLE meta (
     key   TEXT PRIMARY KEY,
     value TEXT NOT NULL
   ) STRICT;
   CREATE TABLE records (
     user_id       TEXT PRIMARY KEY,
     state         INTEGER NOT NULL CHECK (state IN (1, 2, 3)),
     generation    INTEGER NOT NULL CHECK (generation >= 1),
     attempts      INTEGER NOT NULL CHECK (attempts >= 0),
     attempt_limit INTEGER NOT NULL CHECK (attempt_limit >= 1),
     verifier      BLOB,
     sealed        BLOB,
     seal_epoch    INTEGER,
     kdf           TEXT,
     created_at    INTEGER NOT NULL,
     updated_at    INTEGER NOT NULL
   ) STRICT;`,
  // Backend tenants. Only names and versions: each secret is derived in the HSM.
  `CREATE TABLE tenants (
     name       TEXT NOT NULL,
     version    INTEGER NOT NULL CHECK (version >= 1),
     state      INTEGER NOT NULL CHECK (state IN (1, 2)),
     created_at INTEGER NOT NULL,
     revoked_at INTEGER,
     PRIMARY KEY (name, version)
   ) STRICT;`,
  // Authenticated state (see core/state.ts): each record's bucket, the bucket
  // hashes of the Merkle tree whose root is anchored in the HSM, and the undo
  // log of the batch not yet anchored (replayed backwards after a crash).
  `ALTER TABLE records ADD COLUMN bucket INTEGER NOT NULL DEFAULT 0;
   CREATE INDEX records_bucket ON records (bucket, user_id);
   CREATE INDEX records_epoch ON records (state, seal_epoch);
   CREATE TABLE buckets (
     id   INTEGER PRIMARY KEY,
     hash BLOB NOT NULL
   ) STRICT;
   CREATE TABLE undo (
     batch   INTEGER NOT NULL,
     user_id TEXT NOT NULL,
     prev    TEXT,
     PRIMARY KEY (batch, user_id)
   ) STRICT;`,
  // Each record's leaf hash beside it, and a covering index over (bucket, user id, leaf): a
  // read checks its bucket against the trusted tree from the index alone, one leaf hash per
  // read instead of re-reading and re-hashing every row of the bucket (docs/PERFORMANCE.md).
  (db) => {
    db.exec('ALTER TABLE records ADD COLUMN leaf BLOB');
    const update = db.prepare('UPDATE records SET leaf = ? WHERE user_id = ?');
    const page = db.prepare<[number], RowV3 & { rowid: number }>('SELECT rowid, * FROM records WHERE rowid > ? ORDER BY rowid LIMIT 10000');
    for (let last = 0, rows = page.all(last); rows.length; rows = page.all(last)) {
      for (const row of rows) update.run(Buffer.from(leafHashV4(row)), row.user_id);
      last = rows[rows.length - 1]!.rowid;
    }
    db.exec('CREATE INDEX records_leaves ON records (bucket, user_id, leaf); DROP INDEX records_bucket;');
  },
  // Record namespaces (issue 14; core/namespace.ts). Each tenant acts in a home namespace:
  // NULL means its own name. Records written before namespaces are in the legacy namespace
  // "_legacy", with their rows, keys and leaf hashes unchanged, so the anchored state needs no
  // rewrite. The tenants that exist now wrote them (the vault never recorded which one), so
  // their home becomes "_legacy": after the upgrade they see exactly what they saw before, and
  // a single-tenant deployment notices nothing. Tenants added later are isolated in their own
  // namespace. The name is spelled out here, not imported: a shipped migration never changes.
  `ALTER TABLE tenants ADD COLUMN namespace TEXT;
   UPDATE tenants SET namespace = '_legacy';`,
];

/**
 * SQLite follows a link at the database's name and creates its -wal and -shm
 * files through links too, with the database file's mode. So a writer creates
 * the file itself, 0600, exclusively (the log files then inherit 0600 even
 * when the folder was made 0755), and refuses a link at any of the four names.
 */
function prepareFile(path: string): void {
  if (path === ':memory:' || path === '') return;
  for (const f of [path, `${path}-wal`, `${path}-shm`, `${path}-journal`]) {
    if (lexists(f) && !lstatSync(f).isFile()) {
      throw new VaultError(ErrorCodes.STORE_UNAVAILABLE, `${f} is not a regular file (a link or something else is in its place); refusing to open the database through it`);
    }
  }
  try {
    createIfMissing(path, 0o600);
  } catch (e) {
    throw new VaultError(ErrorCodes.STORE_UNAVAILABLE, `cannot create database ${path}: ${(e as Error).message}`);
  }
}

export function openDb(path: string, opts: { readonly?: boolean } = {}): Db {
  let db: Db;
  if (!opts.readonly) prepareFile(path);
  try {
    db = new Database(path, { readonly: opts.readonly ?? false, fileMustExist: opts.readonly ?? false });
  } catch (e) {
    throw new VaultError(ErrorCodes.STORE_UNAVAILABLE, `cannot open database ${path}: ${(e as Error).message}`);
  }
  try {
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = FULL');
    db.pragma('secure_delete = ON');
    db.pragma('foreign_keys = ON');
    db.pragma('busy_timeout = 5000');
    if (!opts.readonly) migrate(db);
    return db;
  } catch (e) {
    db.close();
    if (e instanceof VaultError) throw e;
    throw new VaultError(ErrorCodes.STORE_UNAVAILABLE, `cannot prepare database ${path}: ${(e as Error).message}`);
  }
}

function migrate(db: Db): void {
  const version = db.pragma('user_version', { simple: true }) as number;
  if (version > MIGRATIONS.length) {
    throw new VaultError(
      ErrorCodes.STORE_UNAVAILABLE,
      `database schema version ${version} is newer than this vault (${MIGRATIONS.length}); refusing to downgrade`,
    );
  }
  for (let v = version; v < MIGRATIONS.length; v++) {
    db.transaction(() => {
      const m = MIGRATIONS[v]!;
      if (typeof m === 'string') db.exec(m);
      else m(db);
      db.pragma(`user_version = ${v + 1}`);
    })();
  }
}

export const SCHEMA_VERSION = MIGRATIONS.length;
