// Baseline for the throughput benchmark: libsignal alone, in one Node process, no sidecar.
//
// Two parties with in-memory stores (records kept as libsignal objects in Maps) exchange
// messages in alternating directions, so the ratchet takes a DH step on every message. One
// operation = the sender encrypts a payload and the receiver decrypts it. Prints one JSON line.
//
//   node bridge/bench_raw.mjs [--seconds 3] [--warmup 0.5] [--payload 1024]

import { createRequire } from 'node:module';
import { randomBytes } from 'node:crypto';
import process from 'node:process';

import * as S from '@signalapp/libsignal-client';

const VERSION = createRequire(import.meta.url)('@signalapp/libsignal-client/package.json').version;

function option(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at === -1 ? fallback : Number(process.argv[at + 1]);
}

class Party {
  constructor(name) {
    this.address = S.ProtocolAddress.new(name, 1);
    this.identity = S.IdentityKeyPair.generate();
    this.registrationId = 1 + Math.floor(Math.random() * 0x3ffe);
    this.sessions = new Map();
    this.identities = new Map();
    this.preKeys = new Map();
    this.signedPreKeys = new Map();
    this.kyberPreKeys = new Map();
    const party = this;

    this.sessionStore = new (class extends S.SessionStore {
      async saveSession(address, record) {
        party.sessions.set(address.toString(), record);
      }
      async getSession(address) {
        return party.sessions.get(address.toString()) ?? null;
      }
      async getExistingSessions(addresses) {
        return addresses.map((a) => party.sessions.get(a.toString()));
      }
    })();

    this.identityStore = new (class extends S.IdentityKeyStore {
      async getIdentityKey() {
        return party.identity.privateKey;
      }
      async getIdentityKeyPair() {
        return party.identity;
      }
      async getLocalRegistrationId() {
        return party.registrationId;
      }
      async saveIdentity(address, key) {
        const known = party.identities.get(address.name());
        party.identities.set(address.name(), key);
        return known === undefined || known.equals(key)
          ? S.IdentityChange.NewOrUnchanged
          : S.IdentityChange.ReplacedExisting;
      }
      async isTrustedIdentity(address, key) {
        const known = party.identities.get(address.name());
        return known === undefined || known.equals(key);
      }
      async getIdentity(address) {
        return party.identities.get(address.name()) ?? null;
      }
    })();

    this.preKeyStore = new (class extends S.PreKeyStore {
      async savePreKey(id, record) {
        party.preKeys.set(id, record);
      }
      async getPreKey(id) {
        return must(party.preKeys.get(id), 'prekey');
      }
      async removePreKey(id) {
        party.preKeys.delete(id);
      }
    })();

    this.signedPreKeyStore = new (class extends S.SignedPreKeyStore {
      async saveSignedPreKey(id, record) {
        party.signedPreKeys.set(id, record);
      }
      async getSignedPreKey(id) {
        return must(party.signedPreKeys.get(id), 'signed prekey');
      }
    })();

    this.kyberPreKeyStore = new (class extends S.KyberPreKeyStore {
      async saveKyberPreKey(id, record) {
        party.kyberPreKeys.set(id, record);
      }
      async getKyberPreKey(id) {
        return must(party.kyberPreKeys.get(id), 'kyber prekey');
      }
      async markKyberPreKeyUsed(id) {
        party.kyberPreKeys.delete(id);
      }
    })();
  }

  bundle() {
    const ec = S.PrivateKey.generate();
    const signed = S.PrivateKey.generate();
    const kem = S.KEMKeyPair.generate();
    const signedSig = this.identity.privateKey.sign(signed.getPublicKey().serialize());
    const kemSig = this.identity.privateKey.sign(kem.getPublicKey().serialize());
    this.preKeys.set(1, S.PreKeyRecord.new(1, ec.getPublicKey(), ec));
    this.signedPreKeys.set(
      1,
      S.SignedPreKeyRecord.new(1, Date.now(), signed.getPublicKey(), signed, signedSig),
    );
    this.kyberPreKeys.set(1, S.KyberPreKeyRecord.new(1, Date.now(), kem, kemSig));
    return S.PreKeyBundle.new(
      this.registrationId, 1, 1, ec.getPublicKey(), 1, signed.getPublicKey(), signedSig,
      this.identity.publicKey, 1, kem.getPublicKey(), kemSig,
    );
  }

  async encrypt(to, plaintext) {
    return S.signalEncrypt(
      plaintext, to.address, this.address, this.sessionStore, this.identityStore,
    );
  }

  async decrypt(from, message) {
    if (message.type() === S.CiphertextMessageType.PreKey) {
      return S.signalDecryptPreKey(
        S.PreKeySignalMessage.deserialize(message.serialize()), from.address, this.address,
        this.sessionStore, this.identityStore, this.preKeyStore, this.signedPreKeyStore,
        this.kyberPreKeyStore,
      );
    }
    return S.signalDecrypt(
      S.SignalMessage.deserialize(message.serialize()), from.address, this.address,
      this.sessionStore, this.identityStore,
    );
  }
}

function must(value, what) {
  if (value === undefined) {
    throw new Error(`no such ${what}`);
  }
  return value;
}

async function exchange(sender, receiver, payload) {
  const message = await sender.encrypt(receiver, payload);
  const plaintext = await receiver.decrypt(sender, message);
  if (plaintext.length !== payload.length) {
    throw new Error('round trip changed the payload');
  }
}

async function main() {
  const seconds = option('seconds', 3);
  const warmup = option('warmup', 0.5);
  const payload = new Uint8Array(randomBytes(option('payload', 1024)));

  // Session setup (PQXDH), then one reply so both sides have a sending chain.
  const alice = new Party('alice');
  const bob = new Party('bob');
  await S.processPreKeyBundle(
    bob.bundle(), bob.address, alice.address, alice.sessionStore, alice.identityStore,
  );
  await exchange(alice, bob, payload);
  await exchange(bob, alice, payload);

  let ops = 0;
  const run = async (limitMs) => {
    const end = performance.now() + limitMs;
    let count = 0;
    while (performance.now() < end) {
      const aliceSends = (ops + count) % 2 === 0;
      await (aliceSends ? exchange(alice, bob, payload) : exchange(bob, alice, payload));
      count += 1;
    }
    return count;
  };
  ops += await run(warmup * 1000);
  const started = performance.now();
  const cpuBefore = process.cpuUsage();
  const measured = await run(seconds * 1000);
  const elapsed = (performance.now() - started) / 1000;
  const cpu = process.cpuUsage(cpuBefore);

  process.stdout.write(
    JSON.stringify({
      case: 'raw libsignal, alternating directions, encrypt+decrypt',
      payloadBytes: payload.length,
      ops: measured,
      seconds: elapsed,
      opsPerSec: measured / elapsed,
      cpuMicrosPerOp: (cpu.user + cpu.system) / measured,
      libsignalVersion: VERSION,
      node: process.version,
    }) + '\n',
  );
}

await main();
