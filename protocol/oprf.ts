// OPRF on P-256 with an x-only evaluation, so the vault side is one plain
// PKCS#11 CKM_ECDH1_DERIVE (which yields only x(k·B)).
//
//   client: H = hash_to_curve(input), B = r·H                    (blind)
//   vault:  X = x(k·B)                                           (evaluate, in the HSM)
//   client: P = lift_x(X) = ±k·B, y = x(r⁻¹·P) = x(k·H)          (finalize)
//           oprfOut = SHA-256(frame(DST, input, y))
// x(−Q) = x(Q), so the sign lost by lift_x does not matter. Pure: no I/O.
import { p256, p256_hasher } from '@noble/curves/nist.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { VaultError, ErrorCodes } from './errors.js';
import { concat, frame, utf8 } from './bytes.js';
import { DST, SIZES } from './suite.js';

const Point = p256.Point;
const Fn = Point.Fn;

/** The OPRF input: who is asking, of which vault, with which password. */
export function oprfInput(vaultId: Uint8Array, userId: string, password: Uint8Array): Uint8Array {
  return frame(DST.oprfInput, vaultId, utf8(userId), password);
}

export function hashToGroup(input: Uint8Array): InstanceType<typeof Point> {
  return p256_hasher.hashToCurve(input, { DST: DST.hashToCurve }) as InstanceType<typeof Point>;
}

export interface Blinded {
  /** Secret blinding scalar; stays on the client. */
  r: bigint;
  /** r·H as an uncompressed SEC1 point (65 bytes): the only thing sent. */
  blinded: Uint8Array;
}

/** Blind `input`. `r` is drawn at random unless a test vector fixes it. */
export function blind(input: Uint8Array, r?: bigint): Blinded {
  const scalar = r ?? Fn.fromBytes(p256.utils.randomSecretKey());
  if (scalar <= 0n || scalar >= Fn.ORDER) throw new RangeError('blinding scalar out of range');
  const B = hashToGroup(input).multiply(scalar);
  return { r: scalar, blinded: B.toBytes(false) };
}

/**
 * Check a blinded element from the network: exactly 65 bytes, uncompressed,
 * on the curve, not the identity. Everything else is INVALID_POINT, so an
 * invalid-curve or small-subgroup point never reaches the HSM.
 */
export function validatePoint(bytes: Uint8Array): Uint8Array {
  if (bytes.length !== SIZES.point) {
    throw new VaultError(ErrorCodes.INVALID_LENGTH, `a curve point must be ${SIZES.point} bytes (uncompressed SEC1)`);
  }
  if (bytes[0] !== 0x04) throw new VaultError(ErrorCodes.INVALID_POINT, 'curve point must be uncompressed (0x04 prefix)');
  try {
    const p = Point.fromBytes(bytes);
    p.assertValidity();
    if (p.equals(Point.ZERO)) throw new Error('identity');
  } catch {
    throw new VaultError(ErrorCodes.INVALID_POINT, 'not a valid P-256 point');
  }
  return bytes;
}

/** Software evaluation x(k·B): what the HSM computes. Used for test vectors only. */
export function evaluateReference(k: bigint, blinded: Uint8Array): Uint8Array {
  return Point.fromBytes(validatePoint(blinded)).multiply(k).toBytes(true).slice(1);
}

/** Unblind the vault's x-only answer and hash it into the 32-byte OPRF output. */
export function finalize(input: Uint8Array, r: bigint, evaluatedX: Uint8Array): Uint8Array {
  if (evaluatedX.length !== SIZES.x) {
    throw new VaultError(ErrorCodes.INVALID_LENGTH, `evaluated element must be ${SIZES.x} bytes`);
  }
  let lifted: InstanceType<typeof Point>;
  try {
    lifted = Point.fromBytes(concat(new Uint8Array([0x02]), evaluatedX));
  } catch {
    // Not the x-coordinate of any curve point: not a genuine vault answer.
    throw new VaultError(ErrorCodes.INVALID_POINT, 'evaluated element is not on P-256');
  }
  const unblinded = lifted.multiply(Fn.inv(r));
  const y = unblinded.toBytes(true).slice(1);
  return sha256(frame(DST.oprfFinalize, input, y));
}
