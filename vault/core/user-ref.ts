import { createHash } from 'node:crypto';

/**
 * Pseudonymous user reference for logs: operators can correlate lines without the log holding user ids.
 * Takes the record key (core/namespace.ts), so one user id in two namespaces gets two references;
 * for the legacy namespace the key is the user id, so references from before namespaces still match.
 */
export const userRef = (key: string): string => createHash('sha256').update(key).digest('hex').slice(0, 16);
