// One writer per data folder. SoftHSM lets only one process own a token for
// writes, and the ledger assumes it is the only one moving the HSM anchor, so
// the daemon and an offline bkv-admin command each hold the data folder's lock
// while they have the token open.
//
// The lock is a kernel lock on <data>/vault.lock.db (store/kernel-lock.ts):
// held for the life of the process, gone when it ends however it ends, and the
// same for processes in other PID namespaces (containers on one volume). It
// replaces a pid file whose owner was judged alive or stale by its pid, which
// could not tell "pid 1 in another container" from "pid 1, me after a restart"
// and whose stale-lock takeover was check-then-delete (docs/SECURITY.md F9).
// <data>/vault.lock still says who holds it (pid, host, role, since), for the
// refusal message only: it decides nothing. Across hosts (a shared network
// volume) the HSM anchor's writer id is the second guard (hsm/anchor.ts).
import { readFileSync, rmSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { tryKernelLock } from '../store/kernel-lock.js';
import { writeFileAtomic } from '../../lib/safe-file.js';

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

/** Who holds (or last held) the lock: information only. */
export const lockFile = (dataDir: string): string => join(dataDir, 'vault.lock');
/** The file the kernel lock is taken on. Never delete it, never open it but through kernel-lock.ts. */
export const kernelLockFile = (dataDir: string): string => join(dataDir, 'vault.lock.db');

/** The owner the lock file names, if it names one. Not proof that it still runs: only the kernel lock says that. */
export function lockOwner(dataDir: string): LockOwner | undefined {
  try {
    const o = JSON.parse(readFileSync(lockFile(dataDir), 'utf8')) as LockOwner;
    return typeof o.pid === 'number' && typeof o.role === 'string' ? o : undefined;
  } catch {
    return undefined;
  }
}

export function acquireLock(dataDir: string, role: string): DataLock {
  const lock = tryKernelLock(kernelLockFile(dataDir));
  if (!lock) {
    const o = lockOwner(dataDir);
    const who = o ? `${o.role} (pid ${o.pid} on ${o.host} since ${o.since})` : 'another process (it has not said who yet)';
    throw new VaultError(
      ErrorCodes.HSM_UNAVAILABLE,
      `the data folder ${dataDir} is in use by ${who}; only one process may own the HSM token. ` +
        'The lock is held by the kernel for as long as that process runs: stop it, there is no lock file to remove.',
    );
  }
  const file = lockFile(dataDir);
  try {
    writeFileAtomic(file, JSON.stringify({ pid: process.pid, host: hostname(), role, since: new Date().toISOString() }) + '\n');
  } catch (e) {
    lock.release();
    throw new VaultError(ErrorCodes.STORE_UNAVAILABLE, `cannot write ${file}: ${(e as Error).message}`);
  }
  let released = false;
  return {
    file,
    release() {
      if (released) return;
      released = true;
      // Still ours while we hold the kernel lock: remove it first, then let go.
      rmSync(file, { force: true });
      lock.release();
    },
  };
}
