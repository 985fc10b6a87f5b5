#[courier_rpc::service]
trait Store {
    async fn put(&self, key: String, value: &[u8]) -> bool;
}

fn main() {}
