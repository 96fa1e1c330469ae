import { createHash } from 'node:crypto';

/** Pseudonymous user reference for logs: operators can correlate lines without the log holding user ids. */
export const userRef = (userId: string): string => createHash('sha256').update(userId).digest('hex').slice(0, 16);
