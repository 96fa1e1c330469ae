// What a call failed with, as the vault's stable error code ('NO_ERROR' when it
// succeeded). Anything that is not a VaultError is rethrown: a test expecting a
// code must never pass on a crash.
import { VaultError } from '../../protocol/errors.js';

export async function codeOf(p: Promise<unknown> | (() => unknown)): Promise<string> {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    if (e instanceof VaultError) return e.code;
    throw e;
  }
  return 'NO_ERROR';
}

/** The same for a synchronous call. */
export function codeOfSync(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    if (e instanceof VaultError) return e.code;
    throw e;
  }
  return 'NO_ERROR';
}
