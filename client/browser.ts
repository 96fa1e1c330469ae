// What a web app imports: the SDK (sdk.ts) plus the pieces a page needs
// around it (a WebSocket transport it hands the native WebSocket, the backup
// file format, the 64-digit code). `npm run bundle:sdk` bundles this file for
// browsers with no Node polyfills (scripts/bundle-sdk.ts refuses any `node:`
// or builtin import in its graph); test/integration/browser-sdk.test.ts runs that bundle
// in headless Chromium against a real vault.
export * from './sdk.js';
export { WebSocketTransport, rpcErrorToVaultError } from './transport.js';
export type { WebSocketCtor, WebSocketLike, WebSocketTransportOptions } from './transport.js';
export { sealBackup, openBackup, sealBytes, openBytes, readBackupHeader, BACKUP_MAGIC, HEADER_LENGTH } from './backup-format.js';
export type { BackupHeader, SealOptions } from './backup-format.js';
export { generateBackupKey, formatKeyCode, parseKeyCode, BACKUP_KEY_BYTES } from './backup-code.js';
export { VaultError, ErrorCodes, isVaultError, type ErrorCode } from '../protocol/errors.js';
export { DEFAULT_KDF, type KdfParams } from '../protocol/kdf.js';
