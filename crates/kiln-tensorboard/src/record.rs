//! TensorBoard's record framing (TFRecord): `u64` length, masked CRC-32C of the length's 8 bytes,
//! the data, masked CRC-32C of the data; little-endian throughout.

use std::io::{self, Read, Write};

/// TFRecord's checksum: CRC-32C rotated right by 15 bits plus a constant, so that a CRC of data
/// holding CRCs stays strong.
pub fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Writes one record.
pub fn write_record(out: &mut impl Write, data: &[u8]) -> io::Result<()> {
    let len = (data.len() as u64).to_le_bytes();
    out.write_all(&len)?;
    out.write_all(&masked_crc(&len).to_le_bytes())?;
    out.write_all(data)?;
    out.write_all(&masked_crc(data).to_le_bytes())
}

/// Reads every whole record of `input`, checking both checksums; a torn record at the end (a
/// killed writer) ends the list, as TensorBoard's reader stops there. A record whose checksum
/// fails is an error.
pub fn read_records(input: &mut impl Read) -> Result<Vec<Vec<u8>>, String> {
    let mut bytes = Vec::new();
    input.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    Ok(split_records(&bytes)?.0)
}

/// Bytes of the whole, well-checked records at the start of `bytes`: where a writer that was
/// killed mid-record can continue. `Err`: a whole record fails its checksum (the file was
/// damaged, not torn), so appending to it would leave the points after the damage unread.
pub fn whole_length(bytes: &[u8]) -> Result<usize, String> {
    split_records(bytes).map(|(_, end)| end)
}

fn split_records(bytes: &[u8]) -> Result<(Vec<Vec<u8>>, usize), String> {
    let mut records = Vec::new();
    let mut at = 0usize;
    while at + 12 <= bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
        if masked_crc(len_bytes) != len_crc {
            return Err(format!("record at byte {at}: bad length checksum"));
        }
        let end = at + 12 + len + 4;
        if end > bytes.len() {
            break;
        }
        let data = &bytes[at + 12..at + 12 + len];
        let crc = u32::from_le_bytes(bytes[end - 4..end].try_into().expect("4 bytes"));
        if masked_crc(data) != crc {
            return Err(format!("record at byte {at}: bad data checksum"));
        }
        records.push(data.to_vec());
        at = end;
    }
    Ok((records, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32C's check value; records round-trip; a torn tail is dropped, a flipped bit refused.
    #[test]
    fn records_round_trip_and_a_torn_tail_is_dropped() {
        // CRC-32C check value of "123456789" (RFC 3720).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let mut out = Vec::new();
        write_record(&mut out, b"first").unwrap();
        write_record(&mut out, b"").unwrap();
        write_record(&mut out, b"third record").unwrap();
        assert_eq!(read_records(&mut out.as_slice()).unwrap(), vec![b"first".to_vec(), Vec::new(), b"third record".to_vec()]);
        let torn = &out[..out.len() - 3];
        assert_eq!(read_records(&mut &torn[..]).unwrap().len(), 2);
        assert_eq!(whole_length(torn), Ok(out.len() - (8 + 4 + 12 + 4)));
        assert_eq!(whole_length(&out[..5]), Ok(0), "a torn length");
        assert_eq!(whole_length(&out), Ok(out.len()));
        let mut bad = out.clone();
        bad[13] ^= 1;
        assert!(read_records(&mut bad.as_slice()).is_err());
        assert!(whole_length(&bad).is_err(), "damage is not a torn tail");
    }
}
