// The backup key K as a human-transcribable "64-digit code" (32 bytes = 64 hex digits).
// No checksum on purpose: a mistyped code is caught at restore time by the backup
// header's key check (see backup-format.ts), which is a far stronger check than any
// short checksum and keeps the code exactly 64 digits.
//
// Pure WebCrypto, no `node:` imports: this runs in browsers too.

import { VaultError, ErrorCodes } from '../protocol/errors.js';

export const BACKUP_KEY_BYTES = 32;
const CODE_DIGITS = BACKUP_KEY_BYTES * 2;
const GROUP = 4;

export function generateBackupKey(): Uint8Array {
  return globalThis.crypto.getRandomValues(new Uint8Array(BACKUP_KEY_BYTES));
}

/** 16 groups of 4 uppercase hex digits separated by single spaces. */
export function formatKeyCode(key: Uint8Array): string {
  if (!(key instanceof Uint8Array) || key.length !== BACKUP_KEY_BYTES) {
    throw new VaultError(ErrorCodes.BAD_REQUEST, `backup key must be ${BACKUP_KEY_BYTES} bytes`);
  }
  let hex = '';
  for (const b of key) hex += b.toString(16).padStart(2, '0');
  hex = hex.toUpperCase();
  const groups: string[] = [];
  for (let i = 0; i < hex.length; i += GROUP) groups.push(hex.slice(i, i + GROUP));
  return groups.join(' ');
}

/**
 * Accepts what people actually paste or type: any whitespace (spaces, tabs, line
 * breaks) and dashes as separators, either case. Error messages state counts only and
 * never echo characters: even a "bad" character is usually a mistyped secret digit.
 */
export function parseKeyCode(text: string): Uint8Array {
  if (typeof text !== 'string') {
    throw new VaultError(ErrorCodes.BAD_REQUEST, 'backup code must be a string');
  }
  const compact = text.replace(/[\s-]+/g, '');
  const nonHex = compact.replace(/[0-9a-fA-F]/g, '').length;
  if (nonHex > 0) {
    throw new VaultError(
      ErrorCodes.BAD_REQUEST,
      `backup code may contain only hex digits 0-9 and A-F (spaces and dashes are ignored); ` +
        `found ${nonHex} other character${nonHex === 1 ? '' : 's'}`,
      { invalidCharacters: nonHex },
    );
  }
  if (compact.length !== CODE_DIGITS) {
    throw new VaultError(
      ErrorCodes.BAD_REQUEST,
      `backup code must have exactly ${CODE_DIGITS} hex digits; found ${compact.length}`,
      { digits: compact.length, expected: CODE_DIGITS },
    );
  }
  const key = new Uint8Array(BACKUP_KEY_BYTES);
  for (let i = 0; i < BACKUP_KEY_BYTES; i++) key[i] = parseInt(compact.slice(i * 2, i * 2 + 2), 16);
  return key;
}
