#[courier_rpc::service]
trait Index {
    async fn lookup(&self, keys: Vec<Option<&String>>) -> u64;
}

fn main() {}
