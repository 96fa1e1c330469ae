// Checks on request fields the core accepts from outside. Each failure has its
// own code and a message that names the field, never its value.
import { VaultError, ErrorCodes } from '../../protocol/errors.js';
import { SIZES } from '../../protocol/suite.js';

const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;

export function checkUserId(v: unknown): string {
  if (typeof v !== 'string' || v.length === 0) {
    throw new VaultError(ErrorCodes.INVALID_USER_ID, 'userId must be a non-empty string');
  }
  if (Buffer.byteLength(v, 'utf8') > SIZES.maxUserIdBytes || CONTROL.test(v) || v !== v.normalize('NFC')) {
    throw new VaultError(
      ErrorCodes.INVALID_USER_ID,
      `userId must be NFC-normalised UTF-8 of at most ${SIZES.maxUserIdBytes} bytes without control characters`,
    );
  }
  return v;
}

export function checkBytes(v: unknown, length: number, field: string): Uint8Array {
  if (!(v instanceof Uint8Array)) throw new VaultError(ErrorCodes.BAD_REQUEST, `${field} must be bytes`);
  if (v.length !== length) throw new VaultError(ErrorCodes.INVALID_LENGTH, `${field} must be ${length} bytes`);
  return v;
}
