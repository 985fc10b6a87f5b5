//! `courier cert generate`: a development CA and certificates, so TLS (and
//! mutual TLS) can be tried in one command.

use std::path::PathBuf;

use clap::Subcommand;
use courier_transport::tls::{generate_dev_certs, Validity};

use crate::Failure;

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Write a development CA, a server certificate and client
    /// certificates (PEM, owner-only) into a directory.
    #[command(
        after_help = "Examples: the certificates, then a TLS broker and a client using them\n  courier cert generate --dir certs --client alice\n  courier serve --listen tls://127.0.0.1:7443 --cert certs/server.pem --key certs/server-key.pem\n  courier --url tls://localhost:7443 --tls-ca certs/ca.pem pub hello world\n\nNot for production: the CA's key is written next to the certificates."
    )]
    Generate {
        /// Where to write the files.
        #[arg(long, default_value = "courier-certs")]
        dir: PathBuf,
        /// Names (DNS names or IP addresses) the server certificate is
        /// valid for.
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])]
        names: Vec<String>,
        /// A client certificate for this identity (repeat for several).
        #[arg(long = "client")]
        clients: Vec<String>,
        /// Days the certificates stay valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

pub fn run(command: CertCommand) -> anyhow::Result<()> {
    match command {
        CertCommand::Generate {
            dir,
            names,
            clients,
            days,
        } => {
            let certs = generate_dev_certs(
                &dir,
                &names,
                &clients,
                Validity {
                    from_days_ago: 1,
                    until_days_from_now: i64::from(days.max(1)),
                },
            )
            .map_err(Failure::usage)?;
            println!("CA certificate      {}", certs.ca_cert.display());
            println!(
                "CA key              {} (keep it private)",
                certs.ca_key.display()
            );
            println!(
                "server certificate  {} (for {})",
                certs.server_cert.display(),
                names.join(", ")
            );
            println!("server key          {}", certs.server_key.display());
            for (name, cert, key) in &certs.clients {
                println!("client {name:<12} {} + {}", cert.display(), key.display());
            }
            Ok(())
        }
    }
}
