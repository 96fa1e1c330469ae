// Client key schedule: OPRF output → Argon2id → HKDF → (authKey, envKey).
// The Argon2id parameters travel with the record so a recovery stretches the
// password exactly as the enrolment did; the vault enforces a floor on them.
import { argon2id } from 'hash-wasm';
import { extract, expand } from '@noble/hashes/hkdf.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { VaultError, ErrorCodes } from './errors.js';
import { concat, frame, utf8 } from './bytes.js';
import { DST, SIZES } from './suite.js';

export interface KdfParams {
  alg: 'argon2id';
  /** Memory in KiB. */
  m: number;
  /** Iterations. */
  t: number;
  /** Parallelism (lanes). */
  p: number;
}

/** RFC 9106 second recommended option (64 MiB, 3 passes, 4 lanes). */
export const DEFAULT_KDF: KdfParams = { alg: 'argon2id', m: 65536, t: 3, p: 4 };
/** OWASP's minimum for Argon2id; the vault's default floor. */
export const MIN_KDF: KdfParams = { alg: 'argon2id', m: 19456, t: 2, p: 1 };
/** Hard ceilings so a malicious record cannot make a client allocate unbounded memory. */
export const MAX_KDF = { m: 4 * 1024 * 1024, t: 64, p: 64 } as const;

/** Validate parameters from the network or the database against a floor. */
export function checkKdfParams(v: unknown, floor: KdfParams = MIN_KDF): KdfParams {
  const o = v as Partial<KdfParams> | null;
  const int = (x: unknown): x is number => typeof x === 'number' && Number.isSafeInteger(x);
  if (
    !o ||
    typeof o !== 'object' ||
    o.alg !== 'argon2id' ||
    !int(o.m) ||
    !int(o.t) ||
    !int(o.p) ||
    o.p < 1 ||
    o.p > MAX_KDF.p ||
    o.t < 1 ||
    o.t > MAX_KDF.t ||
    o.m < 8 * o.p ||
    o.m > MAX_KDF.m
  ) {
    throw new VaultError(ErrorCodes.INVALID_KDF_PARAMS, 'kdf must be {alg:"argon2id", m, t, p} with integers in range');
  }
  if (o.m < floor.m || o.t < floor.t || o.p < floor.p) {
    throw new VaultError(
      ErrorCodes.INVALID_KDF_PARAMS,
      `kdf parameters below this vault's floor (m>=${floor.m}, t>=${floor.t}, p>=${floor.p})`,
    );
  }
  return { alg: 'argon2id', m: o.m, t: o.t, p: o.p };
}

export function argon2Salt(vaultId: Uint8Array, userId: string): Uint8Array {
  return sha256(frame(DST.argon2Salt, vaultId, utf8(userId)));
}

export interface ClientKeys {
  /** Proves knowledge of the password to the vault; compared only inside the HSM. */
  authKey: Uint8Array;
  /** Encrypts the backup key inside the envelope; never leaves the client. */
  envKey: Uint8Array;
}

export async function deriveClientKeys(
  oprfOut: Uint8Array,
  kdf: KdfParams,
  vaultId: Uint8Array,
  userId: string,
): Promise<ClientKeys> {
  const stretched = await argon2id({
    password: oprfOut,
    salt: argon2Salt(vaultId, userId),
    parallelism: kdf.p,
    iterations: kdf.t,
    memorySize: kdf.m,
    hashLength: 32,
    outputType: 'binary',
  });
  const rwd = extract(sha256, concat(oprfOut, stretched), utf8(DST.rwd));
  return {
    authKey: expand(sha256, rwd, utf8(DST.authKey), SIZES.authKey),
    envKey: expand(sha256, rwd, utf8(DST.envKey), SIZES.key),
  };
}
