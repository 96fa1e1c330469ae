// One writer per data folder. SoftHSM lets only one process own a token for
// writes, and the ledger assumes it is the only one moving the HSM anchor, so
// the daemon and an offline bkv-admin command each hold <data>/vault.lock
// while they have the token open. The lock names its owner's pid; a lock whose
// pid is gone (or is our own pid, as after a container restart where the new
// daemon is pid 1 again) is stale and taken over.
import { closeSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { VaultError, ErrorCodes } from '../errors.js';

export interface DataLock {
  readonly file: string;
  release(): void;
}

export interface LockOwner {
  pid: number;
  host: string;
  role: string;
  since: string;
}

export const lockFile = (dataDir: string): string => join(dataDir, 'vault.lock');

function alive(pid: number): boolean {
  if (pid === process.pid) return false;
  try {
    process.kill(pid, 0);
  } catch (e) {
    // EPERM: it exists but belongs to someone else, which still means alive.
    if ((e as NodeJS.ErrnoException).code !== 'EPERM') return false;
  }
  // A killed process its parent has not reaped yet still answers kill(0): a zombie owns nothing.
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return true;
  }
}

export function lockOwner(dataDir: string): LockOwner | undefined {
  try {
    const o = JSON.parse(readFileSync(lockFile(dataDir), 'utf8')) as LockOwner;
    return typeof o.pid === 'number' && alive(o.pid) ? o : undefined;
  } catch {
    return undefined;
  }
}

export function acquireLock(dataDir: string, role: string): DataLock {
  const file = lockFile(dataDir);
  const body = JSON.stringify({ pid: process.pid, host: hostname(), role, since: new Date().toISOString() }) + '\n';
  for (let attempt = 0; attempt < 3; attempt++) {
    try {
      const fd = openSync(file, 'wx', 0o600);
      try {
        writeSync(fd, body);
      } finally {
        closeSync(fd);
      }
      let released = false;
      return {
        file,
        release() {
          if (released) return;
          released = true;
          try {
            const o = JSON.parse(readFileSync(file, 'utf8')) as LockOwner;
            if (o.pid === process.pid) rmSync(file, { force: true });
          } catch {
            /* gone already */
          }
        },
      };
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') {
        throw new VaultError(ErrorCodes.STORE_UNAVAILABLE, `cannot create ${file}: ${(e as Error).message}`);
      }
      const owner = lockOwner(dataDir);
      if (owner) {
        throw new VaultError(
          ErrorCodes.HSM_UNAVAILABLE,
          `the data folder is in use by ${owner.role} (pid ${owner.pid} on ${owner.host} since ${owner.since}); ` +
            `only one process may own the HSM token. If no such process runs, remove ${file}.`,
        );
      }
      rmSync(file, { force: true });
    }
  }
  throw new VaultError(ErrorCodes.HSM_UNAVAILABLE, `could not take ${file}: another process keeps creating it`);
}
