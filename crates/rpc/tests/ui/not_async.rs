#[courier_rpc::service]
trait Clock {
    fn now(&self) -> u64;
}

fn main() {}
