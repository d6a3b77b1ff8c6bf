//! A strict reader of what the syslog sink writes: octet-counting frames (RFC 6587 section
//! 3.4.1, RFC 5425 section 4.3) and RFC 5424 messages, following the ABNF of RFC 5424 section 6.

/// An RFC 5424 message, as read back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Message {
    pub pri: u16,
    pub version: u16,
    pub timestamp: String,
    pub hostname: String,
    pub app_name: String,
    pub procid: String,
    pub msgid: String,
    /// SD-ELEMENTs: SD-ID and its (PARAM-NAME, unescaped PARAM-VALUE) pairs.
    pub sd: Vec<(String, Vec<(String, String)>)>,
    pub msg: Vec<u8>,
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn expect(&mut self, c: u8, what: &str) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("want {what} ({:?}) at byte {}", c as char, self.i))
        }
    }

    fn digits(&mut self, min: usize, max: usize, what: &str) -> Result<&'a str, String> {
        let start = self.i;
        while self.i - start < max && self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        if self.i - start < min {
            return Err(format!(
                "want {min} to {max} digits for {what} at byte {start}"
            ));
        }
        Ok(std::str::from_utf8(&self.b[start..self.i]).unwrap())
    }

    fn number(&mut self, n: usize, lo: u32, hi: u32, what: &str) -> Result<u32, String> {
        let v: u32 = self.digits(n, n, what)?.parse().unwrap();
        if v < lo || v > hi {
            return Err(format!("{what} {v} outside {lo}..={hi}"));
        }
        Ok(v)
    }

    /// NILVALUE / 1*max PRINTUSASCII, up to the next SP.
    fn header_field(&mut self, max: usize, what: &str) -> Result<String, String> {
        let start = self.i;
        while self.peek().is_some_and(|c| (33..=126).contains(&c)) {
            self.i += 1;
        }
        let len = self.i - start;
        if len == 0 || len > max {
            return Err(format!("{what} of {len} characters (want 1 to {max})"));
        }
        Ok(String::from_utf8(self.b[start..self.i].to_vec()).unwrap())
    }

    /// SD-NAME = 1*32PRINTUSASCII except '=', SP, ']', '"'.
    fn sd_name(&mut self, what: &str) -> Result<String, String> {
        let start = self.i;
        while self
            .peek()
            .is_some_and(|c| (33..=126).contains(&c) && !matches!(c, b'=' | b']' | b'"'))
        {
            self.i += 1;
        }
        let len = self.i - start;
        if len == 0 || len > 32 {
            return Err(format!("{what} of {len} characters (want 1 to 32)"));
        }
        Ok(String::from_utf8(self.b[start..self.i].to_vec()).unwrap())
    }

    /// PARAM-VALUE: UTF-8 where '"', '\' and ']' must be escaped; returns it unescaped.
    fn param_value(&mut self) -> Result<String, String> {
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err("PARAM-VALUE not closed".into()),
                Some(b'"') => break,
                Some(b']') => return Err("unescaped ']' in PARAM-VALUE".into()),
                Some(b'\\') => {
                    self.i += 1;
                    match self.peek() {
                        Some(c @ (b'"' | b'\\' | b']')) => out.push(c),
                        // RFC 5424: a backslash before anything else is kept as is.
                        Some(c) => out.extend([b'\\', c]),
                        None => return Err("PARAM-VALUE ends in a backslash".into()),
                    }
                    self.i += 1;
                }
                Some(c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|e| format!("PARAM-VALUE is not UTF-8: {e}"))
    }
}

/// Reads one RFC 5424 message strictly.
pub(crate) fn parse(b: &[u8]) -> Result<Message, String> {
    let mut r = Reader { b, i: 0 };
    // PRI = "<" PRIVAL ">", PRIVAL = 1*3DIGIT in 0..=191 (no leading zeros but "0").
    r.expect(b'<', "PRI")?;
    let prival = r.digits(1, 3, "PRIVAL")?;
    if prival.len() > 1 && prival.starts_with('0') {
        return Err(format!("PRIVAL {prival} has a leading zero"));
    }
    let pri: u16 = prival.parse().unwrap();
    if pri > 191 {
        return Err(format!("PRIVAL {pri} > 191"));
    }
    r.expect(b'>', "PRI end")?;
    // VERSION = NONZERO-DIGIT 0*2DIGIT
    if !r.peek().is_some_and(|c| (b'1'..=b'9').contains(&c)) {
        return Err("VERSION must start with a nonzero digit".into());
    }
    let version: u16 = r.digits(1, 3, "VERSION")?.parse().unwrap();
    r.expect(b' ', "SP")?;
    // TIMESTAMP = NILVALUE / FULL-DATE "T" FULL-TIME
    let ts_start = r.i;
    if r.peek() == Some(b'-') {
        r.i += 1;
    } else {
        let year = r.number(4, 0, 9999, "DATE-FULLYEAR")?;
        r.expect(b'-', "-")?;
        let month = r.number(2, 1, 12, "DATE-MONTH")?;
        r.expect(b'-', "-")?;
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let days = match month {
            2 if leap => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        r.number(2, 1, days, "DATE-MDAY")?;
        r.expect(b'T', "T")?;
        r.number(2, 0, 23, "TIME-HOUR")?;
        r.expect(b':', ":")?;
        r.number(2, 0, 59, "TIME-MINUTE")?;
        r.expect(b':', ":")?;
        r.number(2, 0, 59, "TIME-SECOND")?;
        if r.peek() == Some(b'.') {
            r.i += 1;
            r.digits(1, 6, "TIME-SECFRAC")?;
        }
        match r.peek() {
            Some(b'Z') => r.i += 1,
            Some(b'+' | b'-') => {
                r.i += 1;
                r.number(2, 0, 23, "offset hour")?;
                r.expect(b':', ":")?;
                r.number(2, 0, 59, "offset minute")?;
            }
            _ => return Err("want TIME-OFFSET".into()),
        }
    }
    let timestamp = String::from_utf8(b[ts_start..r.i].to_vec()).unwrap();
    r.expect(b' ', "SP")?;
    let hostname = r.header_field(255, "HOSTNAME")?;
    r.expect(b' ', "SP")?;
    let app_name = r.header_field(48, "APP-NAME")?;
    r.expect(b' ', "SP")?;
    let procid = r.header_field(128, "PROCID")?;
    r.expect(b' ', "SP")?;
    let msgid = r.header_field(32, "MSGID")?;
    r.expect(b' ', "SP")?;
    // STRUCTURED-DATA = NILVALUE / 1*SD-ELEMENT
    let mut sd = Vec::new();
    if r.peek() == Some(b'-') {
        r.i += 1;
    } else {
        while r.peek() == Some(b'[') {
            r.i += 1;
            let id = r.sd_name("SD-ID")?;
            let mut params = Vec::new();
            while r.peek() == Some(b' ') {
                r.i += 1;
                let name = r.sd_name("PARAM-NAME")?;
                r.expect(b'=', "=")?;
                r.expect(b'"', "opening quote")?;
                let value = r.param_value()?;
                r.expect(b'"', "closing quote")?;
                params.push((name, value));
            }
            r.expect(b']', "SD-ELEMENT end")?;
            sd.push((id, params));
        }
        if sd.is_empty() {
            return Err("want STRUCTURED-DATA".into());
        }
    }
    let msg = match r.peek() {
        None => Vec::new(),
        Some(b' ') => b[r.i + 1..].to_vec(),
        Some(c) => return Err(format!("want SP before MSG, found {:?}", c as char)),
    };
    Ok(Message {
        pri,
        version,
        timestamp,
        hostname,
        app_name,
        procid,
        msgid,
        sd,
        msg,
    })
}

/// Splits octet-counted frames ("MSG-LEN SP SYSLOG-MSG", MSG-LEN = NONZERO-DIGIT *DIGIT) off
/// the front of `buf`; returns the whole frames and leaves a partial one in `buf`.
pub(crate) fn take_frames(buf: &mut Vec<u8>) -> Result<Vec<Vec<u8>>, String> {
    let mut frames = Vec::new();
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let Some(sp) = rest.iter().position(|&c| c == b' ') else {
            if rest.len() > 10 || rest.iter().any(|c| !c.is_ascii_digit()) {
                return Err(format!("bad MSG-LEN {:?}", String::from_utf8_lossy(rest)));
            }
            break;
        };
        let len = &rest[..sp];
        if len.is_empty()
            || len[0] == b'0'
            || len.len() > 10
            || len.iter().any(|c| !c.is_ascii_digit())
        {
            return Err(format!("bad MSG-LEN {:?}", String::from_utf8_lossy(len)));
        }
        let n: usize = std::str::from_utf8(len).unwrap().parse().unwrap();
        if rest.len() < sp + 1 + n {
            break;
        }
        frames.push(rest[sp + 1..sp + 1 + n].to_vec());
        at += sp + 1 + n;
    }
    buf.drain(..at);
    Ok(frames)
}

#[test]
fn the_reader_refuses_what_the_abnf_does_not_allow() {
    let good = b"<134>1 2024-02-29T23:59:59.999Z host app 42 flow [x@1 k=\"v\\]\"] {}";
    let m = parse(good).unwrap();
    assert_eq!(m.sd, vec![("x@1".into(), vec![("k".into(), "v]".into())])]);
    for bad in [
        &b"<192>1 - h a p m -"[..],
        b"<034>1 - h a p m -",
        b"<34>0 - h a p m -",
        b"<34>1 2023-02-29T00:00:00Z h a p m -",
        b"<34>1 2024-01-01T24:00:00Z h a p m -",
        b"<34>1 2024-01-01T00:00:00.1234567Z h a p m -",
        b"<34>1 2024-01-01T00:00:00 h a p m -",
        b"<34>1 - h  a p m -",
        b"<34>1 - h a p 123456789012345678901234567890123 -",
        b"<34>1 - h a p m [x k=\"a]b\"]",
        b"<34>1 - h a p m [x k=v]",
        b"<34>1 - h a p m []",
        b"<34>1 - h a p m -x",
    ] {
        assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
    }
    let mut buf = b"3 abc1 x12 ".to_vec();
    assert_eq!(
        take_frames(&mut buf).unwrap(),
        vec![b"abc".to_vec(), b"x".to_vec()]
    );
    assert_eq!(buf, b"12 ");
    assert!(take_frames(&mut b"03 abc".to_vec()).is_err());
    assert!(take_frames(&mut b"x3 abc".to_vec()).is_err());
}
