//! The protocol's numbers, under the names Sendmail's `include/libmilter/mfdef.h` gives them
//! (protocol version 6, libmilter 8.14 and later; the same values in Postfix's
//! `src/milter/milter8.c`). Nothing here is decoded: these are the octets on the wire.

/// The protocol version we speak and offer (`SMFI_PROT_VERSION`).
pub const SMFI_PROT_VERSION: u32 = 6;
/// The oldest version a milter may answer with (libmilter's `SMFI_PROT_VERSION_MIN`).
pub const SMFI_PROT_VERSION_MIN: u32 = 2;
/// Largest body chunk in one `SMFIC_BODY` (`MILTER_CHUNK_SIZE`).
pub const MILTER_CHUNK_SIZE: usize = 65535;
/// The three 32-bit fields of an `SMFIC_OPTNEG` packet (`MILTER_OPTLEN`).
pub const MILTER_OPTLEN: usize = 12;

// Commands, MTA to milter (`SMFIC_*`).
pub const SMFIC_ABORT: u8 = b'A';
pub const SMFIC_BODY: u8 = b'B';
pub const SMFIC_CONNECT: u8 = b'C';
pub const SMFIC_MACRO: u8 = b'D';
pub const SMFIC_BODYEOB: u8 = b'E';
pub const SMFIC_HELO: u8 = b'H';
pub const SMFIC_QUIT_NC: u8 = b'K';
pub const SMFIC_HEADER: u8 = b'L';
pub const SMFIC_MAIL: u8 = b'M';
pub const SMFIC_EOH: u8 = b'N';
pub const SMFIC_OPTNEG: u8 = b'O';
pub const SMFIC_QUIT: u8 = b'Q';
pub const SMFIC_RCPT: u8 = b'R';
pub const SMFIC_DATA: u8 = b'T';
pub const SMFIC_UNKNOWN: u8 = b'U';

// Replies and actions, milter to MTA (`SMFIR_*`).
pub const SMFIR_ADDRCPT: u8 = b'+';
pub const SMFIR_DELRCPT: u8 = b'-';
pub const SMFIR_ADDRCPT_PAR: u8 = b'2';
pub const SMFIR_SHUTDOWN: u8 = b'4';
pub const SMFIR_ACCEPT: u8 = b'a';
pub const SMFIR_REPLBODY: u8 = b'b';
pub const SMFIR_CONTINUE: u8 = b'c';
pub const SMFIR_DISCARD: u8 = b'd';
pub const SMFIR_CHGFROM: u8 = b'e';
pub const SMFIR_CONN_FAIL: u8 = b'f';
pub const SMFIR_ADDHEADER: u8 = b'h';
pub const SMFIR_INSHEADER: u8 = b'i';
pub const SMFIR_SETSYMLIST: u8 = b'l';
pub const SMFIR_CHGHEADER: u8 = b'm';
pub const SMFIR_PROGRESS: u8 = b'p';
pub const SMFIR_QUARANTINE: u8 = b'q';
pub const SMFIR_REJECT: u8 = b'r';
pub const SMFIR_SKIP: u8 = b's';
pub const SMFIR_TEMPFAIL: u8 = b't';
pub const SMFIR_REPLYCODE: u8 = b'y';

// Address families in `SMFIC_CONNECT` (`SMFIA_*`).
pub const SMFIA_UNKNOWN: u8 = b'U';
pub const SMFIA_UNIX: u8 = b'L';
pub const SMFIA_INET: u8 = b'4';
pub const SMFIA_INET6: u8 = b'6';

// Actions a milter may take (`SMFIF_*`), offered by the MTA, requested by the milter.
pub const SMFIF_ADDHDRS: u32 = 0x0000_0001;
pub const SMFIF_CHGBODY: u32 = 0x0000_0002;
pub const SMFIF_ADDRCPT: u32 = 0x0000_0004;
pub const SMFIF_DELRCPT: u32 = 0x0000_0008;
pub const SMFIF_CHGHDRS: u32 = 0x0000_0010;
pub const SMFIF_QUARANTINE: u32 = 0x0000_0020;
pub const SMFIF_CHGFROM: u32 = 0x0000_0040;
pub const SMFIF_ADDRCPT_PAR: u32 = 0x0000_0080;
pub const SMFIF_SETSYMLIST: u32 = 0x0000_0100;

// Protocol flags (`SMFIP_*`): stages the milter does not want, stages it will not answer,
// and extensions.
pub const SMFIP_NOCONNECT: u32 = 0x0000_0001;
pub const SMFIP_NOHELO: u32 = 0x0000_0002;
pub const SMFIP_NOMAIL: u32 = 0x0000_0004;
pub const SMFIP_NORCPT: u32 = 0x0000_0008;
pub const SMFIP_NOBODY: u32 = 0x0000_0010;
pub const SMFIP_NOHDRS: u32 = 0x0000_0020;
pub const SMFIP_NOEOH: u32 = 0x0000_0040;
pub const SMFIP_NR_HDR: u32 = 0x0000_0080;
pub const SMFIP_NOUNKNOWN: u32 = 0x0000_0100;
pub const SMFIP_NODATA: u32 = 0x0000_0200;
pub const SMFIP_SKIP: u32 = 0x0000_0400;
pub const SMFIP_RCPT_REJ: u32 = 0x0000_0800;
pub const SMFIP_NR_CONN: u32 = 0x0000_1000;
pub const SMFIP_NR_HELO: u32 = 0x0000_2000;
pub const SMFIP_NR_MAIL: u32 = 0x0000_4000;
pub const SMFIP_NR_RCPT: u32 = 0x0000_8000;
pub const SMFIP_NR_DATA: u32 = 0x0001_0000;
pub const SMFIP_NR_UNKN: u32 = 0x0002_0000;
pub const SMFIP_NR_EOH: u32 = 0x0004_0000;
pub const SMFIP_NR_BODY: u32 = 0x0008_0000;
pub const SMFIP_HDR_LEADSPC: u32 = 0x0010_0000;

/// The protocol flags a version 2 milter knows (`SMFI_V2_PROT`: the seven `SMFIP_NO*`).
pub const SMFI_V2_PROT: u32 = 0x0000_007F;
/// Flags a version 3 milter adds (Postfix's `MILTER8_V3_PROTO_MASK`).
pub const SMFI_V3_PROT: u32 = SMFI_V2_PROT | SMFIP_NOUNKNOWN;
/// Flags a version 4 (and 5) milter adds: DATA exists from version 4 on.
pub const SMFI_V4_PROT: u32 = SMFI_V3_PROT | SMFIP_NODATA;
/// Every flag of version 6 (`SMFI_CURR_PROT`).
pub const SMFI_CURR_PROT: u32 = 0x001F_FFFF;
/// Every action of version 6 (`SMFI_CURR_ACTS` plus `SMFIF_SETSYMLIST`).
pub const SMFI_CURR_ACTS: u32 = 0x0000_01FF;

// Macro list indexes in an `SMFIC_OPTNEG` answer's symbol lists (`SMFIM_*`, mfapi.h).
pub const SMFIM_CONNECT: u32 = 0;
pub const SMFIM_HELO: u32 = 1;
pub const SMFIM_ENVFROM: u32 = 2;
pub const SMFIM_ENVRCPT: u32 = 3;
pub const SMFIM_DATA: u32 = 4;
pub const SMFIM_EOM: u32 = 5;
pub const SMFIM_EOH: u32 = 6;

/// The libmilter name of a reply code, for messages; `None` for a code it does not define.
pub fn reply_name(code: u8) -> Option<&'static str> {
    Some(match code {
        SMFIR_ADDRCPT => "SMFIR_ADDRCPT",
        SMFIR_DELRCPT => "SMFIR_DELRCPT",
        SMFIR_ADDRCPT_PAR => "SMFIR_ADDRCPT_PAR",
        SMFIR_SHUTDOWN => "SMFIR_SHUTDOWN",
        SMFIR_ACCEPT => "SMFIR_ACCEPT",
        SMFIR_REPLBODY => "SMFIR_REPLBODY",
        SMFIR_CONTINUE => "SMFIR_CONTINUE",
        SMFIR_DISCARD => "SMFIR_DISCARD",
        SMFIR_CHGFROM => "SMFIR_CHGFROM",
        SMFIR_CONN_FAIL => "SMFIR_CONN_FAIL",
        SMFIR_ADDHEADER => "SMFIR_ADDHEADER",
        SMFIR_INSHEADER => "SMFIR_INSHEADER",
        SMFIR_SETSYMLIST => "SMFIR_SETSYMLIST",
        SMFIR_CHGHEADER => "SMFIR_CHGHEADER",
        SMFIR_PROGRESS => "SMFIR_PROGRESS",
        SMFIR_QUARANTINE => "SMFIR_QUARANTINE",
        SMFIR_REJECT => "SMFIR_REJECT",
        SMFIR_SKIP => "SMFIR_SKIP",
        SMFIR_TEMPFAIL => "SMFIR_TEMPFAIL",
        SMFIR_REPLYCODE => "SMFIR_REPLYCODE",
        SMFIC_OPTNEG => "SMFIC_OPTNEG",
        _ => return None,
    })
}
