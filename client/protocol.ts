// The client's half of enrolment and recovery, as pure steps around the two
// round trips. The transport (direct calls in tests, the end-to-end channel in
// the SDK) is the caller's business.
import { blind, finalize, oprfInput } from '../protocol/oprf.js';
import { deriveClientKeys, type ClientKeys, type KdfParams } from '../protocol/kdf.js';
import { openEnvelope, sealEnvelope } from '../protocol/envelope.js';
import { utf8 } from '../protocol/bytes.js';
import { SIZES } from '../protocol/suite.js';
import { VaultError, ErrorCodes } from '../protocol/errors.js';

export interface PendingOprf {
  vaultId: Uint8Array;
  userId: string;
  input: Uint8Array;
  r: bigint;
  /** Send this to the vault (enroll.begin / recover.begin). */
  blinded: Uint8Array;
}

/** Passwords are compared as NFC-normalised UTF-8, so "é" typed two ways is one password. */
export function passwordBytes(password: string): Uint8Array {
  const b = utf8(password.normalize('NFC'));
  if (b.length === 0 || b.length > SIZES.maxPasswordBytes) {
    throw new VaultError(ErrorCodes.BAD_REQUEST, `password must be 1..${SIZES.maxPasswordBytes} bytes of UTF-8`);
  }
  return b;
}

export function startOprf(vaultId: Uint8Array, userId: string, password: string, r?: bigint): PendingOprf {
  const input = oprfInput(vaultId, userId, passwordBytes(password));
  const { r: scalar, blinded } = blind(input, r);
  return { vaultId, userId, input, r: scalar, blinded };
}

/** Turn the vault's evaluation into the password-derived keys. */
export async function finishOprf(p: PendingOprf, evaluated: Uint8Array, kdf: KdfParams): Promise<ClientKeys> {
  const out = finalize(p.input, p.r, evaluated);
  return deriveClientKeys(out, kdf, p.vaultId, p.userId);
}

/** enroll.finish payload: authKey for the vault's verifier, and K sealed under envKey. */
export async function enrollPayload(
  p: PendingOprf,
  evaluated: Uint8Array,
  kdf: KdfParams,
  backupKey: Uint8Array,
): Promise<{ authKey: Uint8Array; envelope: Uint8Array; kdf: KdfParams }> {
  const keys = await finishOprf(p, evaluated, kdf);
  return { authKey: keys.authKey, envelope: await sealEnvelope(keys.envKey, backupKey, p.vaultId, p.userId), kdf };
}

export async function openRecovered(p: PendingOprf, keys: ClientKeys, envelope: Uint8Array): Promise<Uint8Array> {
  return openEnvelope(keys.envKey, envelope, p.vaultId, p.userId);
}
