//! Address syntax: what parses, what it means, and what each mistake says.

use courier_transport::{Address, AddressError};

#[test]
fn valid_addresses_parse_and_print_back() {
    for text in [
        "tcp://127.0.0.1:7000",
        "tcp://localhost:0",
        "tcp://[::1]:65535",
        "udp://10.0.0.1:53",
        "udp://[fe80::1]:9",
        "unix:///tmp/courier.sock",
        "mem://orders",
        "mem://a.b_c-d",
    ] {
        let address: Address = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(address.to_string(), text);
    }
    assert_eq!(
        "tcp://[::1]:80".parse::<Address>().unwrap(),
        Address::Tcp {
            host: "::1".into(),
            port: 80
        }
    );
}

#[test]
fn each_mistake_gets_a_clear_error_showing_the_expected_form() {
    let cases: &[(&str, &str)] = &[
        ("localhost:80", "has no scheme"),
        ("http://x:1", "unsupported scheme \"http\""),
        ("tcp://localhost", "missing :port"),
        ("tcp://:80", "empty host"),
        ("tcp://host:99999", "port is not a number"),
        ("tcp://host:http", "port is not a number"),
        ("tcp://::1:80", "must be written in [ ]"),
        ("tcp://[::1:80", "unclosed '['"),
        ("tcp://[nothost]:80", "not an IPv6 address"),
        ("tcp://a b:80", "whitespace"),
        ("udp://host", "expected udp://host:port"),
        ("unix://", "empty path"),
        ("mem://", "empty name"),
        ("mem://has space", "outside [A-Za-z0-9._-]"),
    ];
    for (input, expected) in cases {
        let err = input.parse::<Address>().unwrap_err();
        let message = err.to_string();
        assert!(message.contains(expected), "{input}: {message}");
        assert!(
            message.contains("expected"),
            "{input}: message should show the expected form: {message}"
        );
        assert!(!err.is_retryable());
    }
    let long = format!("unix:///{}", "x".repeat(200));
    assert!(matches!(
        long.parse::<Address>(),
        Err(AddressError::InvalidUnixPath { .. })
    ));
    let long = format!("mem://{}", "x".repeat(300));
    assert!(matches!(
        long.parse::<Address>(),
        Err(AddressError::InvalidMemName { .. })
    ));
}
