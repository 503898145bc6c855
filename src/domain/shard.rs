//! Co-location of a session and its keys.
//!
//! Every key of a session must live on the same Redis Cluster hash slot as the session itself,
//! so that VerifyKey can check the key, its session's policy and its rate-limit window in one
//! atomic script. Hash slots are chosen by the hash tag of a Redis key name, and VerifyKey only
//! knows the key id, so the tag must be computable from the key id alone *and* from the session
//! id alone. We get that by giving both a shard number (CRC16 of the id, modulo [`SHARDS`]) and
//! by drawing key ids until the key id's shard equals its session's shard. The shard number
//! itself is the hash tag (see `store::redis::keys`). The in-memory store stripes its locks by
//! the same shard, so a session and its keys are guarded by one mutex there too.
//!
//! 1024 shards: enough to spread over any realistic number of cluster masters, few enough that
//! drawing a key id takes ~1000 cheap attempts (tens of microseconds).

/// Number of logical shards. Changing it re-homes every key: it is part of the data format.
pub const SHARDS: u16 = 1024;

/// The shard of an id: CRC16 (XMODEM, the checksum Redis Cluster itself uses) modulo [`SHARDS`].
pub fn shard_of(id: &[u8]) -> u16 {
    crc16_xmodem(id) % SHARDS
}

/// CRC-16/XMODEM lookup table, built at compile time.
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC-16/XMODEM (poly 0x1021, init 0), table-driven: it runs for every storage key name of
/// every VerifyKey, and ~1000 times per key id drawn.
pub fn crc16_xmodem(data: &[u8]) -> u16 {
    data.iter().fold(0u16, |crc, &byte| {
        (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ byte)]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_the_redis_cluster_reference_vector() {
        // The Redis Cluster specification gives CRC16("123456789") = 0x31C3.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
    }

    #[test]
    fn table_matches_the_bitwise_definition() {
        fn bitwise(data: &[u8]) -> u16 {
            let mut crc: u16 = 0;
            for &byte in data {
                crc ^= u16::from(byte) << 8;
                for _ in 0..8 {
                    crc = if crc & 0x8000 != 0 {
                        (crc << 1) ^ 0x1021
                    } else {
                        crc << 1
                    };
                }
            }
            crc
        }
        for s in ["", "a", "AbCd1234", "session-1", "{}:{}"] {
            assert_eq!(crc16_xmodem(s.as_bytes()), bitwise(s.as_bytes()), "{s}");
        }
    }

    #[test]
    fn shard_is_in_range() {
        for id in [
            "a",
            "session-1",
            "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
        ] {
            assert!(shard_of(id.as_bytes()) < SHARDS);
        }
    }
}
